"""Run only the `ingest` stage of a pipeline config: python jobs/ingest.py --config FILE [key=value ...]."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.full_pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--stages", "ingest", *sys.argv[1:]]))
