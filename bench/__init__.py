"""bench: ours side by side with the engines people run instead, one section per file; `python -m bench`."""
