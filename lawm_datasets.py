"""`datasets/` under its import name, `lawm_datasets`, from wherever this checkout is.

A top-level package named `datasets` would shadow Hugging Face's, so the folder is imported as `lawm_datasets`. The
installed package maps that name to the folder (pyproject.toml), but `ray job submit --working-dir .` ships the
working directory, not the install: without this file, a job's driver and workers would import the cluster image's
installed copy of `datasets/` while `lawm/`, `pipelines/` and `jobs/` came from the upload. Python finds this module
on sys.path (the checkout, or a job's working directory, comes before site-packages and before the editable install's
finder), and the `__path__` below makes it a package whose submodules are the files of the `datasets/` beside it.
"""
import os

__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets")]
