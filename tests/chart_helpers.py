"""Rendering the project's Helm charts offline, with the real Helm SDK (the [deploy] extra)."""

from __future__ import annotations

from pathlib import Path


def rendered_docs(chart: Path, values: dict | None = None, name: str = "tv", namespace: str = "ml") -> list[dict]:
    """Every manifest ``chart`` renders for an install of release ``name`` (NOTES.txt left out)."""
    import helm_python as helm
    import yaml

    manifests = helm.Chart.load(chart).render(values, name=name, namespace=namespace, is_install=True)
    return [doc for path, text in manifests.items() if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]
