"""Lightning callbacks and logging helpers."""

from fourdgen.media import encode_gif, log_images, log_video, save_video_mp4  # re-exported: they lived here

__all__ = ["encode_gif", "log_images", "log_video", "save_video_mp4"]
