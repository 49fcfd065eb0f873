"""Datasets: layouts and manifests (`layouts`, `manifest`), image decoding and checks
(`images`), near-duplicate groups and the split (`split`), and ingest (`ingest`)."""
