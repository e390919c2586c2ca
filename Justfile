# piecework tasks. `just` lists them.

default:
    @just --list

# The demo: api + scheduler + worker on the embedded in-memory bus and store.
dev *args:
    cargo run -- dev {{args}}

# Every test (installs nats-server and redis-server from Debian packages if missing).
test *args:
    scripts/test {{args}}

# The benchmarks on a release build: piecework against raw JetStream and BullMQ, figures and
# ratios in the terminal and target/bench/latest.json (see BENCHMARKS.md). `just bench --smoke`
# is the quick check CI runs.
bench *args:
    cargo build --release --locked -p piecework -p piecework-bench -p piecework-piece-probe
    target/release/piecework-bench {{args}}

# A fleet (api, scheduler, 2 workers) under steady webhook load on a release build: reports
# memory growth per process and lost runs; fails past 5% growth or any lost run.
soak duration="30m" rate="50":
    cargo build --release --locked -p piecework -p piecework-bench -p piecework-piece-probe
    target/release/piecework-bench --soak {{duration}} --soak-rate {{rate}} --out target/bench/soak.json

# The property tests (flow parser, templates, protobuf, piece-protocol frames) with far more
# cases than CI runs: a million each by default, on an optimized build.
fuzz cases="1000000":
    PROPTEST_CASES={{cases}} cargo test --release --locked -p piecework-core -p piecework-sdk -p piecework-proto --test properties

# Rewrites docs/openapi.json from the code, after an API change.
openapi:
    PW_UPDATE_OPENAPI=1 cargo test -p piecework-api openapi::tests::the_committed_document

# Formatting and clippy, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

fmt:
    cargo fmt --all

# Scaffold a private piece: a standalone package in ./NAME that builds into a bundle.
new-piece name:
    cargo run -q -- piece new {{name}}

# Build a piece's directory into a bundle (default: the example) in target/pieces.
build-piece dir="pieces/custom/my-company-api" *args:
    cargo run -q -- piece build {{dir}} {{args}}

# Check flow files against the built-in pieces.
validate +files:
    cargo run -q -- flow validate {{files}}

# What CI runs.
ci:
    bash .ci/run

# The whole installation with Jaeger, Prometheus and Grafana (needs Docker and PW_ENCRYPTION_KEY).
compose-up:
    docker compose up -d --build

# Follow the audit trail of the API at PW_API_URL (default http://127.0.0.1:8080).
audit *args:
    cargo run -q -- audit tail {{args}}
