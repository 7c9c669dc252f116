// Many refused calls in a row over one keep-alive HTTP/1.1 transport, each with a sizable body:
//   node refusals.mjs URL TOKEN PROTOCOL(connect|grpcweb) METHOD COUNT BODY_BYTES
// Prints {"codes": {<connect code number>: count}, "messages": [distinct messages]}.
import { readFileSync } from "node:fs";
import { createClient, ConnectError } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";

const [url, token, protocol, method, count, bodyBytes] = process.argv.slice(2);
const descriptorSet = new URL("../../metald/gen/vmprovisioner.binpb", import.meta.url);
const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(descriptorSet)));
const service = registry.getService("vmprovisioner.v1.VmService");
const transport = {
  connect: () => createConnectTransport({ baseUrl: url, httpVersion: "1.1", useBinaryFormat: false }),
  grpcweb: () => createGrpcWebTransport({ baseUrl: url, httpVersion: "1.1" }),
}[protocol]();
const client = createClient(service, transport);
const rpc = method[0].toLowerCase() + method.slice(1);
const headers = token ? { authorization: `Bearer ${token}` } : {};
const request = { vmId: "x".repeat(Number(bodyBytes)) };
const codes = {};
const messages = new Set();
for (let i = 0; i < Number(count); i++) {
  let code = 0;
  try {
    await client[rpc](request, { headers });
  } catch (err) {
    const e = ConnectError.from(err);
    code = e.code;
    messages.add(e.rawMessage);
  }
  codes[code] = (codes[code] || 0) + 1;
}
console.log(JSON.stringify({ codes, messages: [...messages] }));
