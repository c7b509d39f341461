"""graphdriver as Docker plugins: JSON over HTTP/1.1 on a unix socket.

:mod:`.http` is the plugin protocol (``/Plugin.Activate``, endpoints, ``Err``), shared by every
plugin kind; :mod:`.volume` is the VolumeDriver plugin over the core's VolumeStore; :mod:`.cli`
is ``graphdriver serve docker-volume``.
"""
