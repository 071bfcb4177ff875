"""dicom-ingest: the core shared by the receiver and the workers."""

__version__ = "0.1.0"
