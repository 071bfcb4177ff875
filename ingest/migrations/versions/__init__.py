"""The catalog's schema revisions, oldest first."""
