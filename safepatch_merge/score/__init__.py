"""Saliency scoring (SNIP, magnitude) and score directories."""
