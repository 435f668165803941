"""Scrapers: sources, the crawl engine, downloads into the blob store, dedup and cursors in Redis."""

from deeptarget.scraper.engine import Crawler
from deeptarget.scraper.sink import CelerySink, PostSink

__all__ = ["CelerySink", "Crawler", "PostSink"]
