// A real @connectrpc/connect-node client, driven by the Python tests:
//   node connect_node.mjs URL TOKEN PROTOCOL(connect|grpc|grpcweb) METHOD JSON [TAKE]
// Prints {"ok": response} or {"error": {code, message, details:[{reason, domain, metadata}]}}.
// A server-streaming METHOD prints {"ok": [the first TAKE messages]} (default 1), then hangs up.
import { readFileSync } from "node:fs";
import { createClient, ConnectError } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { createFileRegistry, fromBinary, toJson } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";

const [url, token, protocol, method, body, take] = process.argv.slice(2);
const descriptorSet = new URL("../../metald/gen/vmprovisioner.binpb", import.meta.url);
const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(descriptorSet)));
const service = registry.getService("vmprovisioner.v1.VmService");
const errorInfo = registry.getMessage("google.rpc.ErrorInfo");
const make = {
  connect: () => createConnectTransport({ baseUrl: url, httpVersion: "1.1", useBinaryFormat: false }),
  grpc: () => createGrpcTransport({ baseUrl: url }),
  grpcweb: () => createGrpcWebTransport({ baseUrl: url, httpVersion: "1.1" }),
}[protocol];
const client = createClient(service, make());
const rpc = method[0].toLowerCase() + method.slice(1);
const methodDesc = service.methods.find((m) => m.name === method);
const options = { headers: { authorization: `Bearer ${token}` } };
const asJson = (message) => toJson(methodDesc.output, message, { useProtoFieldName: true });
try {
  if (methodDesc.methodKind === "server_streaming") {
    // Hang up once TAKE messages came: the stream itself never ends.
    const abort = new AbortController();
    const seen = [];
    try {
      for await (const message of client[rpc](JSON.parse(body), { ...options, signal: abort.signal })) {
        seen.push(asJson(message));
        if (seen.length >= Number(take || 1)) abort.abort();
      }
    } catch (err) {
      if (!abort.signal.aborted) throw err;
    }
    console.log(JSON.stringify({ ok: seen }));
    process.exit(0);
  } else {
    console.log(JSON.stringify({ ok: asJson(await client[rpc](JSON.parse(body), options)) }));
  }
} catch (err) {
  const e = ConnectError.from(err);
  const details = e.findDetails(errorInfo).map((d) => ({ reason: d.reason, domain: d.domain, metadata: d.metadata }));
  console.log(JSON.stringify({ error: { code: e.code, message: e.rawMessage, details } }));
}
