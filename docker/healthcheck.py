"""Container healthcheck: GET a URL as the service's clients do (service name, credentials); exit 0 on 200.

    python healthcheck.py mlflow URL    # HTTP basic auth from MLFLOW_TRACKING_USERNAME / _PASSWORD
    python healthcheck.py prefect URL   # HTTP basic auth from PREFECT_API_AUTH_STRING (user:password)
    python healthcheck.py worker URL    # no credentials
    python healthcheck.py dask tcp://dask-scheduler:8786 [NAME]   # the scheduler answers (and lists worker NAME)

Standard library only for HTTP: it runs in the MLflow image and the project image alike (`dask` needs the
project image's `distributed`: it asks the scheduler, as the scoring flow does). A bare /health would be
green while every real request is refused (MLflow answers 403 to an unknown Host, 401 without a login).
"""

import base64
import os
import sys
import urllib.error
import urllib.request


def dask(address: str, name: str | None) -> int:
    """The scheduler answers a client; with NAME, a worker named NAME (or NAME-<n>, --nworkers) is registered."""
    from distributed import Client

    try:
        with Client(address, timeout=8) as client:
            names = [str(w.get("name")) for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    except (OSError, TimeoutError) as err:
        print(f"unhealthy: {address}: {err}", file=sys.stderr)
        return 1
    if name and not any(n == name or n.startswith(f"{name}-") for n in names):
        print(f"unhealthy: worker {name} is not registered with {address} ({len(names)} workers)", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    kind, url = sys.argv[1], sys.argv[2]
    if kind == "dask":
        return dask(url, sys.argv[3] if len(sys.argv) > 3 else None)
    if kind == "mlflow":
        login = f"{os.environ.get('MLFLOW_TRACKING_USERNAME', '')}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
    elif kind == "prefect":
        login = os.environ.get("PREFECT_API_AUTH_STRING", "")
    else:
        login = ""
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=8) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as err:
        print(f"unhealthy: {url}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
