// One streamed answer through navtwist with a Node SDK: node sdk_stream.cjs openai|anthropic
// Prints one JSON line per text delta ({"text", "t"}), then {"done"} or {"error"} (exit 3).
// Node's built-in fetch ignores HTTPS_PROXY (before NODE_USE_ENV_PROXY, Node 24), so the SDKs
// are given undici's fetch with a ProxyAgent for it; navtwist's CA comes from NODE_EXTRA_CA_CERTS.
"use strict";
const { ProxyAgent, fetch } = require("undici");

const kind = process.argv[2];
const fetchOptions = { dispatcher: new ProxyAgent(process.env.HTTPS_PROXY) };
const common = { fetch, fetchOptions, maxRetries: 0, timeout: 30000 };
const out = (fields) => process.stdout.write(JSON.stringify({ ...fields, t: performance.now() / 1000 }) + "\n");

async function openai() {
  const OpenAI = require("openai");
  const client = new OpenAI({ baseURL: "https://inference.local/v1", apiKey: "sk-client-placeholder", ...common });
  const stream = await client.chat.completions.create({
    model: "any", messages: [{ role: "user", content: "hi" }], stream: true,
  });
  for await (const chunk of stream) {
    const text = chunk.choices?.[0]?.delta?.content;
    if (text) out({ text });
  }
}

async function anthropic() {
  const Anthropic = require("@anthropic-ai/sdk");
  const client = new Anthropic({ baseURL: "https://inference.local", apiKey: "sk-ant-client-placeholder", ...common });
  const stream = client.messages.stream({ model: "any", max_tokens: 64, messages: [{ role: "user", content: "hi" }] });
  for await (const event of stream) {
    if (event.type === "content_block_delta" && event.delta.type === "text_delta") out({ text: event.delta.text });
  }
}

({ openai, anthropic })[kind]().then(
  () => out({ done: true }),
  (error) => { out({ error: String(error?.message ?? error) }); process.exitCode = 3; },
);
