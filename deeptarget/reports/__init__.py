"""Reports people look at: self-contained HTML pages with their figures as PNG files beside them."""
