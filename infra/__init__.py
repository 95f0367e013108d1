"""The launcher side of zooaudit: the ``zooaudit`` command line (``cli``) and the local stack
(``stack``: Prefect server + UI, SeaweedFS S3, Dask, deployment runner). Installed as
``zooaudit_infra``; the rest of this folder (Dockerfile, k8s/) is the scale-out files."""
