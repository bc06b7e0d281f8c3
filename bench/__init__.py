"""`make bench`: h2load against the trustplane server and a bare grpc.aio echo ceiling.

See ARCHITECTURE.md §8 and docs/development.md#benchmark. Modules:

- `bench.cases`: what is measured (append a case there);
- `bench.echo`: the bare grpc.aio echo server, the ceiling every ratio is relative to;
- `bench.h2load`: gRPC framing, running h2load and parsing its output and log file;
- `bench.servers`: starting, pinning, health-checking and stopping the server processes;
- `bench.scrape`: the server-side correctness check through the Prometheus endpoint;
- `bench.report`: the Markdown table;
- `bench.__main__`: the orchestration.
"""
