"""Benchmarks: dicom-ingest against DCMTK storescp (and Orthanc when installed)."""
