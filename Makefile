# Both `make demo` and `make test` create .venv on a fresh machine.
PY := .venv/bin/python
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test bench clean-demo venv browser science

venv: .venv/.installed

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --constraint constraints.txt -e '.[dev,sim]'
	touch $@

demo: venv
	$(PY) jobs/full_pipeline.py --config jobs/configs/demo.yaml $(ARGS)

# The report test renders HTML in headless Chromium (Debian's package); installed here when missing and root.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo 'make test needs chromium: apt-get install chromium (as root)'; exit 1; }

test: venv browser
	$(PY) -m pytest -q $(ARGS)

bench: venv
	$(PY) bench/run_all.py $(ARGS)

clean-demo:
	rm -rf runs/demo

# A local MLflow tracking server (sqlite + artifacts under runs/mlflow-server/, 127.0.0.1:5000 or PORT=..., one worker);
# it prints the MLFLOW_TRACKING_URI to export. Stop it with Ctrl-C. Settings: infra/mlflow/serve.sh.
.PHONY: mlflow-server
mlflow-server: venv
	infra/mlflow/serve.sh $(ARGS)

# The science benchmark (issue 13): a fixed grid on the synthetic world and both simulators, 71 min on 2 CPUs (run 3),
# ending in science/report.md + report.html with one VERDICT line per question. Not part of `make test`.
.PHONY: science
science: venv
	$(PY) science/run.py $(ARGS)
