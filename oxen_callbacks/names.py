"""Every name this library shares with the outside world, spelled once.

MLflow tag names, MLflow artifact paths, and the environment variables read. The
model repository's layout (``runs/<run>/...``) lives in :mod:`oxen_callbacks.model_repo`.
Users may search MLflow by these tags (``tags."oxen.dataset.commit" = '...'``): renaming
one breaks their queries and every run logged before.
"""

from __future__ import annotations

# -- MLflow run tags: set as soon as each fact is known ------------------------------------------
TAG_RUN = "oxen.run"  # the run's name: its folder runs/<run>/ in the model repository
TAG_DATASET_REPO = "oxen.dataset.repo"  # dataset repository, local path or URL without credentials
TAG_DATASET_REVISION = "oxen.dataset.revision"  # the branch, tag or commit the user asked for
TAG_DATASET_COMMIT = "oxen.dataset.commit"  # the dataset commit it resolved to
TAG_DATASET_PATHS = "oxen.dataset.paths"  # JSON list of the paths used from that commit
TAG_MODEL_REPO = "oxen.model.repo"  # model repository the checkpoints are committed to
TAG_MODEL_COMMIT = "oxen.model.commit"  # commit holding the latest/final checkpoint
TAG_MODEL_PATH = "oxen.model.path"  # that checkpoint's path inside the model repository
TAG_CODE_GIT_COMMIT = "oxen.code.git_commit"  # git commit of the training code (absent outside git)
TAG_LINEAGE_STATUS = "oxen.lineage.status"  # how the run's lineage ended: FINISHED, FAILED, KILLED, PREEMPTED
TAG_ENDPOINT_PREFIX = "oxen.endpoint."  # + endpoint slug: the run's model serves that endpoint
TAG_FIT = "oxen.fit"  # the fit logging to the run: "<its start, ms since 1970>:<its fit id>" (a later fit's replaces it)
TAG_CREATION = "oxen.creation"  # a run we created: its create op's token (a repeated create's twin is deleted)

# -- MLflow logged-model tags: one logged model per committed checkpoint (MLflow 3) ----------------
# besides TAG_RUN and TAG_MODEL_REPO / TAG_MODEL_COMMIT / TAG_MODEL_PATH, naming that checkpoint
TAG_MODEL_BEST = "oxen.model.best"  # "true" on the run's best checkpoint (the monitored metric's), when known
TAG_MODEL_FINAL = "oxen.model.final"  # "true" on the run's last checkpoint

# -- MLflow artifacts --------------------------------------------------------------------------
POINTER_ARTIFACT_DIR = "oxen"  # the run's artifact folder of Oxen pointers (a registered version's source)
LINEAGE_ARTIFACT_NAME = "lineage.json"  # the lineage record, in POINTER_ARTIFACT_DIR
LINEAGE_GRAPH_ARTIFACT_NAME = "lineage.svg"  # the lineage picture, in POINTER_ARTIFACT_DIR
LINEAGE_ARTIFACT = f"{POINTER_ARTIFACT_DIR}/{LINEAGE_ARTIFACT_NAME}"  # the record's artifact path
LINEAGE_GRAPH_ARTIFACT = f"{POINTER_ARTIFACT_DIR}/{LINEAGE_GRAPH_ARTIFACT_NAME}"  # the picture's artifact path

# -- environment variables of this library -------------------------------------------------------
ENV_CACHE = "OXEN_CALLBACKS_CACHE"  # the cache folder (snapshots, queues, journals)
ENV_AUTHOR_NAME = "OXEN_CALLBACKS_AUTHOR_NAME"  # author name of checkpoint commits (with ENV_AUTHOR_EMAIL)
ENV_AUTHOR_EMAIL = "OXEN_CALLBACKS_AUTHOR_EMAIL"  # author email of checkpoint commits (with ENV_AUTHOR_NAME)
ENV_OXEN_API_KEY = "OXEN_API_KEY"  # bearer token for every Oxen host without a per-host one (oxenai reads none)
ENV_OXEN_API_KEY_HOST_PREFIX = "OXEN_API_KEY_"  # + host, upper-cased, non-alphanumerics as '_': one host's token
ENV_CHILD_PROGRESS = "OXEN_CALLBACKS_CHILD_PROGRESS"  # set for a child process: "1" draw progress bars, "0" not

# -- environment variables of other tools, read here ---------------------------------------------
ENV_OXEN_CONFIG_DIR = "OXEN_CONFIG_DIR"  # Oxen's config folder (user_config.toml, auth_config.toml)
ENV_XDG_CACHE_HOME = "XDG_CACHE_HOME"  # the user's cache root, when ENV_CACHE is not set
ENV_SLURM_JOB_ID = "SLURM_JOB_ID"  # the SLURM job: a requeued job keeps it (the same run goes on)
ENV_SLURM_ARRAY_JOB_ID = "SLURM_ARRAY_JOB_ID"  # a job array's id (with ENV_SLURM_ARRAY_TASK_ID: the job)
ENV_SLURM_ARRAY_TASK_ID = "SLURM_ARRAY_TASK_ID"  # the task of a job array
ENV_RANKS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")  # a launcher's ranks: non-zero means not rank 0
ENV_MLFLOW_PREFIX = "MLFLOW_"  # every MLflow setting: handed on to the sink process
ENV_MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"  # MLflow's tracking store
ENV_MLFLOW_EXPERIMENT_ID = "MLFLOW_EXPERIMENT_ID"  # experiment of a new run (when no name is given)
ENV_MLFLOW_EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"  # experiment of a new run, by name
ENV_MLFLOW_RUN_ID = "MLFLOW_RUN_ID"  # the run MLflow's start_run joins (set in Ray Train workers)
ENV_MLFLOW_TRACKING_USERNAME = "MLFLOW_TRACKING_USERNAME"  # basic auth user for REST queries
ENV_MLFLOW_TRACKING_PASSWORD = "MLFLOW_TRACKING_PASSWORD"  # basic auth password for REST queries
ENV_MLFLOW_TRACKING_TOKEN = "MLFLOW_TRACKING_TOKEN"  # bearer token for REST queries
ENV_MLFLOW_TRACKING_SERVER_CERT_PATH = "MLFLOW_TRACKING_SERVER_CERT_PATH"  # CA bundle for REST queries
ENV_MLFLOW_TRACKING_INSECURE_TLS = "MLFLOW_TRACKING_INSECURE_TLS"  # "true": REST queries skip TLS checks
ENV_MLFLOW_CLIENT_ONLY = ("MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_AUTH")  # set: query via MlflowClient
#: what MLflow authenticates a tracking server's requests with (set: sent to whatever server a client names)
ENV_MLFLOW_CREDENTIALS = (ENV_MLFLOW_TRACKING_TOKEN, ENV_MLFLOW_TRACKING_USERNAME, ENV_MLFLOW_TRACKING_PASSWORD,
                          *ENV_MLFLOW_CLIENT_ONLY, "MLFLOW_TRACKING_AWS_SIGV4", "DATABRICKS_TOKEN")
MLFLOW_CREDENTIALS_FILE = "~/.mlflow/credentials"  # MLflow's user name and password when the environment has none
ENV_MLFLOW_HTTP_REQUEST_MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"  # MLflow's HTTP retries
ENV_MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"  # MLflow's HTTP retry backoff
ENV_MLFLOW_HTTP_REQUEST_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"  # MLflow's HTTP request timeout (s)
ENV_JUPYTER_NOTEBOOK = "JPY_SESSION_NAME"  # set by the Jupyter server in a kernel: the notebook's path
