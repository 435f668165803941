"""deeptarget: turn social-media images into audiences.

Scrape posts, filter faces, embed images, index them in FAISS, suggest hashtags with implicit ALS, and roll posts up
into per-user interest profiles. See README.md and deeptarget/ARCHITECTURE.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deeptarget")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
