"""Extraction: one module per step (`caption`, `ground`, `encode`) on a shared step base
(`base`), and the process-wide loaded models (`loaded`)."""
