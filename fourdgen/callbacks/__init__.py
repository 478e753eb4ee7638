"""Lightning callbacks and logging helpers."""

from fourdgen.callbacks.media import encode_gif, log_images, log_video, save_video_mp4

__all__ = ["encode_gif", "log_images", "log_video", "save_video_mp4"]
