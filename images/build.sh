#!/usr/bin/env bash
# Build, push or list the project's images. The Makefile's build-images, push-images and images-list
# targets call this; every setting is an environment variable:
#
#   images/build.sh build|push|list
#   REGISTRY=123456789012.dkr.ecr.eu-west-1.amazonaws.com/genai images/build.sh push
#
#   REGISTRY          where the images live (default ghcr.io/genai-pipelines); stage images are
#                     $REGISTRY/stages/<name>, their shared base $REGISTRY/stages, Airflow $REGISTRY/airflow
#   TAG               default: the git revision (with -dirty for uncommitted changes); `latest` is added locally
#   IMAGES            which ones (default: stage-base tokenizer trainer evaluator inferencer airflow)
#   TORCH_VARIANT     cpu (default); cuda: PyPI's CUDA torch wheel with the GPU extras, every version from
#                     images/stage-base/requirements-cuda.lock (make build-images-cuda: the trainer and
#                     inferencer); or a PyTorch CUDA index name such as cu128. Stage images of a variant other
#                     than cpu are tagged <tag>-<variant> (latest-<variant>), never over the CPU ones.
#   BASE_IMAGE        stage images' Python base (default python:3.11-slim-bookworm)
#   AIRFLOW_BASE_IMAGE  the Airflow image's base (default apache/airflow:3.3.2-python3.11)
#   STAGE_EXTRAS      object-store clients in the stage images (default s3,gcs,azure)
#   EXTRA_CA_CERTS    a PEM file or a folder of .crt files trusted during the build (corporate TLS
#                     proxies); default: the host's locally added CAs in /usr/local/share/ca-certificates.
#                     Passed as a build secret: never stored in an image layer.
#   TORCH_WHEELS      folder to take a CPU torch wheel from for offline builds (default: pip's find-links)
#   DOCKER            the docker client (default docker); it must support BuildKit
set -euo pipefail
cd "$(dirname "$0")/.."

action=${1:-build}
DOCKER=${DOCKER:-docker}
REGISTRY=${REGISTRY:-ghcr.io/genai-pipelines}
REGISTRY=${REGISTRY%/}
ALL_IMAGES="stage-base tokenizer trainer evaluator inferencer airflow"
IMAGES=${IMAGES:-$ALL_IMAGES}
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
VARIANT_SUFFIX=
[ "$TORCH_VARIANT" = cpu ] || VARIANT_SUFFIX=-$TORCH_VARIANT
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
AIRFLOW_BASE_IMAGE=${AIRFLOW_BASE_IMAGE:-apache/airflow:3.3.2-python3.11}
STAGE_EXTRAS=${STAGE_EXTRAS-s3,gcs,azure}
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -z "${TAG:-}" ]; then
  TAG=$(git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
  if ! git diff --quiet HEAD -- stages dags images pyproject.toml 2>/dev/null; then TAG="$TAG-dirty"; fi
fi
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
SOURCE=${SOURCE:-https://github.com/genai-pipelines/genai-pipelines}

die() { printf 'error: %s\n' "$*" >&2; exit 2; }

# A Docker reference: lowercase host[:port] and path components (distribution/reference grammar).
component='[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*'
host='[a-z0-9]([a-z0-9.-]*[a-z0-9])?'
if ! [[ $REGISTRY =~ ^$host(:[0-9]+)?(/$component)*$ ]]; then
  die "REGISTRY='$REGISTRY' is not a valid image repository prefix: use lowercase host[:port]/path, for example
  123456789012.dkr.ecr.eu-west-1.amazonaws.com/genai (ECR), europe-west4-docker.pkg.dev/my-project/genai
  (Artifact Registry) or myregistry.azurecr.io/genai (ACR)"
fi
[[ $TORCH_VARIANT =~ ^[a-z0-9][a-z0-9.]*$ ]] || die "TORCH_VARIANT='$TORCH_VARIANT' is not a variant: cpu, cuda or a PyTorch index name such as cu128"
[[ $TAG$VARIANT_SUFFIX =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] \
  || die "TAG='$TAG$VARIANT_SUFFIX' is not a valid image tag ([A-Za-z0-9_.-], at most 128)"
for image in $IMAGES; do
  [[ " $ALL_IMAGES " == *" $image "* ]] || die "IMAGES: unknown image '$image' (known: $ALL_IMAGES)"
done

# The stage images (images/stage/Dockerfile): image -> the stage its entry point runs | its description.
# The same mapping as the stage table in dags/genai_dags/stage_specs.py (tests/docker checks the two agree).
stage_image() {
  case $1 in
    tokenizer) echo "tokenize|python -m stages.tokenize: tokenize, and the other CPU stages (merge_predictions, publish)" ;;
    trainer) echo "train_lora|python -m stages.train_lora: LoRA fine-tuning (and base_model, the tiny base used where no hub is reachable)" ;;
    evaluator) echo "evaluate|python -m stages.evaluate: held-out perplexity, samples, report and the quality gate" ;;
    inferencer) echo "batch_infer|python -m stages.batch_infer: batch inference over a JSONL of prompts" ;;
  esac
}

ref() {  # the reference of one image at one tag (a stage image of a GPU variant: <tag>-<variant>)
  case $1 in
    stage-base) echo "$REGISTRY/stages:$2$VARIANT_SUFFIX" ;;
    airflow) echo "$REGISTRY/airflow:$2" ;;
    *) echo "$REGISTRY/stages/$1:$2$VARIANT_SUFFIX" ;;
  esac
}

if [ "$action" = list ]; then
  for image in $IMAGES; do ref "$image" "$TAG"; done
  exit 0
fi
[ "$action" = build ] || [ "$action" = push ] || die "usage: images/build.sh build|push|list"

if ! command -v "$DOCKER" >/dev/null 2>&1; then
  die "no docker client '$DOCKER' on PATH: install Docker (https://docs.docker.com/engine/install/) or set DOCKER=<client>"
fi
if ! info_error=$("$DOCKER" info 2>&1 >/dev/null); then
  die "cannot reach a Docker engine through '$DOCKER' (${info_error##*$'\n'}).
  Start it (Docker Desktop; 'sudo systemctl start docker'; or as root 'dockerd &'), or point DOCKER_HOST at one."
fi
# BuildKit is needed for the build secret (extra CA certificates) and the pip cache mount. Clients from
# 23.0 on use it through the buildx plugin; older ones have it built in.
if ! "$DOCKER" buildx version >/dev/null 2>&1; then
  client=$("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null || echo 0)
  if [ "${client%%.*}" -ge 23 ] 2>/dev/null; then
    die "docker client $client has no buildx plugin, which BuildKit builds need: install it (package
  docker-buildx or docker-buildx-plugin), or set DOCKER to a client that has BuildKit"
  fi
fi
export DOCKER_BUILDKIT=1

needs_base() {  # fail fast, before any build, when a FROM image is neither here nor pullable
  local image=$1 what=$2
  "$DOCKER" image inspect "$image" >/dev/null 2>&1 && return 0
  echo "pulling $image ($what)"
  if ! pull_error=$(timeout 300 "$DOCKER" pull --quiet "$image" 2>&1); then
    die "the base image $image ($what) is not available locally and cannot be pulled:
  ${pull_error##*$'\n'}
  Pull it where a registry is reachable and 'docker load' it here, set ${3}=<a mirror of it>, or on a
  machine with no registry at all build a local stand-in: images/standins.sh"
  fi
}
for image in $IMAGES; do
  case $image in
    stage-base) needs_base "$BASE_IMAGE" "Python base of the stage images" BASE_IMAGE ;;
    airflow) needs_base "$AIRFLOW_BASE_IMAGE" "base of the Airflow image" AIRFLOW_BASE_IMAGE ;;
  esac
done

# Build inputs that must never be committed live in build/ (ignored by git).
mkdir -p build/wheels build/secrets
ca_file=build/secrets/extra-ca.pem
: >"$ca_file"
EXTRA_CA_CERTS=${EXTRA_CA_CERTS-/usr/local/share/ca-certificates}
if [ -d "$EXTRA_CA_CERTS" ]; then
  find "$EXTRA_CA_CERTS" -name '*.crt' -type f -print0 | sort -z | xargs -0 -r cat >>"$ca_file"
elif [ -n "$EXTRA_CA_CERTS" ] && [ -f "$EXTRA_CA_CERTS" ]; then
  cat "$EXTRA_CA_CERTS" >>"$ca_file"
elif [ -n "$EXTRA_CA_CERTS" ]; then
  die "EXTRA_CA_CERTS=$EXTRA_CA_CERTS is neither a file nor a folder"
fi
[ -s "$ca_file" ] && echo "trusting extra CA certificates from $EXTRA_CA_CERTS during the build"

# An offline CPU build takes torch from a local wheel (pip's find-links folder by default).
torch_pin=$(grep -E '^torch==' images/stage-base/requirements.lock | cut -d= -f3)
if [ "$TORCH_VARIANT" = cpu ] && [[ " $IMAGES " == *" stage-base "* ]] && ! ls build/wheels/torch-"$torch_pin"+cpu-*.whl >/dev/null 2>&1; then
  TORCH_WHEELS=${TORCH_WHEELS:-$(pip config get global.find-links 2>/dev/null || true)}
  for dir in $TORCH_WHEELS; do
    for wheel in "${dir#file://}"/torch-"$torch_pin"+cpu-cp311-*.whl; do
      [ -f "$wheel" ] || continue
      echo "using the local torch wheel $wheel"
      ln -f "$wheel" build/wheels/ 2>/dev/null || cp "$wheel" build/wheels/
      break 2
    done
  done
fi

build() {  # build <image> <dockerfile folder under images/> [build args...]
  local image=$1 dir=$2
  shift 2
  local start=$SECONDS
  echo "== building $(ref "$image" "$TAG")"
  "$DOCKER" build --file "images/$dir/Dockerfile" \
    --secret id=extra_ca,src="$ca_file" \
    --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" --build-arg SOURCE="$SOURCE" \
    --tag "$(ref "$image" "$TAG")" --tag "$(ref "$image" latest)" "$@" .
  echo "== built $(ref "$image" "$TAG") in $((SECONDS - start)) s"
}

base_ref=$(ref stage-base "$TAG")
for image in $IMAGES; do
  case $image in
    stage-base)
      build stage-base stage-base --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg TORCH_VARIANT="$TORCH_VARIANT" --build-arg STAGE_EXTRAS="$STAGE_EXTRAS" ;;
    airflow)
      build airflow airflow --build-arg AIRFLOW_BASE_IMAGE="$AIRFLOW_BASE_IMAGE" ;;
    *)
      "$DOCKER" image inspect "$base_ref" >/dev/null 2>&1 \
        || die "$image is built on $base_ref, which does not exist: build it too (IMAGES='stage-base $image')"
      IFS='|' read -r stage description <<<"$(stage_image "$image")"
      build "$image" stage --build-arg STAGE_BASE="$base_ref" --build-arg STAGE="$stage" \
        --build-arg IMAGE="$image" --build-arg DESCRIPTION="$description" ;;
  esac
done

echo "== image sizes"
for image in $IMAGES; do
  "$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "$(ref "$image" "$TAG")"
done

if [ "$action" = push ]; then
  for image in $IMAGES; do
    echo "== pushing $(ref "$image" "$TAG")"
    "$DOCKER" push "$(ref "$image" "$TAG")" || die "pushing $(ref "$image" "$TAG") failed: log in to the
  registry first (README.md, 'Images': aws ecr get-login-password | docker login ..., gcloud auth
  configure-docker ..., az acr login ...) and check that the repository exists"
  done
fi
