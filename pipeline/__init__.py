"""Parquet -> HDF5 ETL for CMS end-to-end images, and a generator of realistic test data."""
__version__ = "0.1.0"
