"""An OTLP trace receiver for the tests: a gRPC TraceService on 127.0.0.1.

Prints `otlp receiver listening port=N` once it serves, then one JSON line per span
it receives: the service and pid of the process that sent it, the span's name, its
trace, span and parent ids (hex), and its attributes. Needs the `grpcio` and
`opentelemetry-proto` packages (.ci/run installs them).
"""

import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    line = json.dumps(
                        {
                            "service": resource.get("service.name"),
                            "pid": resource.get("process.pid"),
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "attributes": attributes(span.attributes),
                        }
                    )
                    with LOCK:
                        print(line, flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"otlp receiver listening port={port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
