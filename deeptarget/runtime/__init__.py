"""Process plumbing: the embedded redis-server, the aiohttp server wrapper, starting and supervising processes."""
