"""The participant engine: 2PC and saga steps over one SQLite inventory.

Flight, hotel and car all run this engine; they differ only in their catalog
(`services.catalogs`).
"""
