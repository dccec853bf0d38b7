"""Prefect flows: orchestration only. The work lives in ``vit_pipeline``."""
