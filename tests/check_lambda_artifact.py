"""Check the built ingest function: run with `python -I -S` (standard library only), it
imports the handler from the artifact and fails if pandas, numpy, pyarrow or dask are
shipped in it or loaded by it."""

import os
import sys

HEAVY = ("pandas", "numpy", "pyarrow", "dask", "distributed", "polars", "duckdb")


def main(artifact: str) -> int:
    """Exit 0 when the artifact's handler loads light; 1 naming what is heavy."""
    shipped = sorted(n for n in os.listdir(artifact) if n.split("-")[0].lower() in HEAVY)
    sys.path.insert(0, artifact)
    os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
    import app  # noqa: F401  (the handler module, as Lambda imports it)

    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    if shipped or loaded:
        print(f"lambda artifact too heavy: shipped={shipped} loaded={loaded}", file=sys.stderr)
        return 1
    print(f"lambda artifact ok: handler imports without {', '.join(HEAVY)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
