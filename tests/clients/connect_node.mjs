// A real @connectrpc/connect-node client, driven by the Python tests:
//   node connect_node.mjs URL TOKEN PROTOCOL(connect|grpc|grpcweb) METHOD JSON
// Prints {"ok": response} or {"error": {code, message, details:[{reason, domain, metadata}]}}.
import { readFileSync } from "node:fs";
import { createClient, ConnectError } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { createFileRegistry, fromBinary, toJson } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";

const [url, token, protocol, method, body] = process.argv.slice(2);
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
try {
  const response = await client[rpc](JSON.parse(body), { headers: { authorization: `Bearer ${token}` } });
  console.log(JSON.stringify({ ok: toJson(methodDesc.output, response, { useProtoFieldName: true }) }));
} catch (err) {
  const e = ConnectError.from(err);
  const details = e.findDetails(errorInfo).map((d) => ({ reason: d.reason, domain: d.domain, metadata: d.metadata }));
  console.log(JSON.stringify({ error: { code: e.code, message: e.rawMessage, details } }));
}
