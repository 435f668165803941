"""Read-only questions over an indexed deployment: similar images, hashtags for an image, profiles, audiences."""
