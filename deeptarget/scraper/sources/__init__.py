"""Where the crawl engine's posts come from: one module per source, each an async iterator of batches of posts.

- ``graph``: ``GraphTargets``, the hashtags and accounts of the settings, walked page by page over the Graph API
  (cursors, the hashtag quota, loop evidence); yields a ``Batch`` per page, and saves the cursor past it once the
  engine handled it.
- ``feeds``: ``PartnerFeeds``, partners' JSON-lines feeds; yields each feed's valid posts, which the engine puts on
  the ingest stream.
- ``folders``: ``InstaloaderFolders``, instaloader download folders; yields a ``Batch`` per ``page_size`` posts, with
  a fetcher that reads images from inside the folder.
- ``ingest``: ``PushedPosts``, the ingest stream of pushed posts; yields lists of (entry id, post), acknowledged by
  the engine once handled.

Each is switched on by its settings (``enabled``); the ingest stream always is. The engine (``scraper/engine.py``)
decides when each runs, and sends every batch through the same pipeline: claim -> download -> sink.
"""

from deeptarget.scraper.sources.base import Batch, Fetcher
from deeptarget.scraper.sources.feeds import PartnerFeeds
from deeptarget.scraper.sources.folders import InstaloaderFolders
from deeptarget.scraper.sources.graph import ACCOUNT, HASHTAG, GraphTargets
from deeptarget.scraper.sources.ingest import Entries, PushedPosts

__all__ = [
    "ACCOUNT",
    "HASHTAG",
    "Batch",
    "Entries",
    "Fetcher",
    "GraphTargets",
    "InstaloaderFolders",
    "PartnerFeeds",
    "PushedPosts",
]
