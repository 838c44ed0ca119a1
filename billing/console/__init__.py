"""The cost console: the admin page staff who read costs land on (`views`), what it reads
(`selectors`: rollups and small tables) and its daily spend chart (`chart`, SVG drawn here)."""
