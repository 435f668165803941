"""The web UI, served by the API on its own port under ``/``: pictures first (``pages``), thumbnails from the blob
store (``thumbnails``), an optional key (``access``), charts drawn as SVG on the server (``charts``)."""
