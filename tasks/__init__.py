"""Pipeline stages: plain typed functions plus thin Prefect task wrappers."""
