"""Per-user interest profiles rolled up from the user's processed posts."""

from deeptarget.profiles.builder import build_profile, post_weights

__all__ = ["build_profile", "post_weights"]
