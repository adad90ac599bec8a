"""tierlab's SimPy world: links with shared bandwidth, engines with batching, policies from core."""
