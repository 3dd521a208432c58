"""Frame input: video files, image folders, JPEG decoding, the registry sample clip."""

#: Default pixel limit (height x width) of every input: the node's ``max_image_pixels``, ``mpvss
#: segment`` and ``mpvss bag``'s ``--max-image-pixels``, and :mod:`~mpvss_ros.ros.conversions`'
#: default. 4096 x 4096 is above every common robot camera (12 MP included). Larger frames are
#: refused before they are segmented: a one-colour 8000 x 8000 PNG is 206 kB, and segmenting it
#: with mpvss_lite took 1.5 s and raised the process's peak resident memory from 0.42 to 1.7 GB (2
#: CPU threads, 2026-12-05).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
