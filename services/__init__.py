"""The flight, hotel and car services: one participant engine, three catalogs."""
