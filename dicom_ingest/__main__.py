"""``python -m dicom_ingest``: the ``dicom-ingest`` command line."""

import sys

from dicom_ingest.cli import main

sys.exit(main())
