"""deeplab-cli: DeepLab-LargeFOV semantic segmentation from the command line."""

__version__ = "0.1.0"


def _opencv_pixel_limit() -> None:
    """Raise OpenCV's decoder limit to deeplab's before anything imports cv2.

    OpenCV refuses images over OPENCV_IO_MAX_IMAGE_PIXELS (default 2^30), read once, when cv2 loads;
    deeplab checks its own limit (DEEPLAB_MAX_PIXELS, --max-pixels) from the header first. Keeping
    OpenCV's at least 2^30 leaves its guard for formats whose header Pillow cannot read; a user who
    sets OPENCV_IO_MAX_IMAGE_PIXELS keeps that value.
    """
    import os

    text = os.environ.get("DEEPLAB_MAX_PIXELS", "").strip().replace("_", "")
    wanted = int(text) if text.isdigit() else 0  # a bad value is reported by the command, not here
    if text.isdigit() and wanted == 0:
        wanted = 1 << 40  # 0 means no limit of deeplab's own
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(max(1 << 30, wanted)))


_opencv_pixel_limit()
