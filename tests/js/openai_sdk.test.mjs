// The official `openai` JavaScript SDK, unchanged, against a Veil edge (run by tests/test_js_sdk.py).
// VEIL_BASE_URL is the edge's OpenAI base URL (ending in /v1), VEIL_MODEL the model it serves.
// The model is tiny: replies are checked for validity and shape, never for meaning.
import assert from "node:assert/strict";
import { test } from "node:test";

import OpenAI from "openai";

const baseURL = process.env.VEIL_BASE_URL;
const model = process.env.VEIL_MODEL;
assert.ok(baseURL && baseURL.endsWith("/v1"), `VEIL_BASE_URL must be the edge's base URL ending in /v1, got ${baseURL}`);
assert.ok(model, "VEIL_MODEL must name the model the edge serves");

const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 300_000 });

function checkUsage(usage) {
  assert.ok(usage, "usage is reported");
  assert.ok(Number.isInteger(usage.prompt_tokens) && usage.prompt_tokens > 0, JSON.stringify(usage));
  assert.ok(Number.isInteger(usage.completion_tokens) && usage.completion_tokens > 0, JSON.stringify(usage));
  assert.equal(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
}

test("non-stream chat completion", async () => {
  const r = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "What is the capital of France?" }],
    temperature: 0,
    max_tokens: 16,
  });
  assert.equal(r.object, "chat.completion");
  assert.equal(r.model, model);
  assert.equal(typeof r.id, "string");
  assert.equal(r.choices.length, 1);
  const [choice] = r.choices;
  assert.equal(choice.index, 0);
  assert.equal(choice.message.role, "assistant");
  assert.equal(typeof choice.message.content, "string");
  assert.ok(choice.message.content.length > 0);
  assert.ok(["stop", "length"].includes(choice.finish_reason), choice.finish_reason);
  checkUsage(r.usage);
  assert.ok(r.usage.completion_tokens <= 16);
});

test("streamed chat completion with stream_options.include_usage", async () => {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "Name a color." }],
    temperature: 0,
    max_tokens: 16,
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  assert.ok(chunks.length >= 3, `a role chunk, content and a usage chunk; got ${chunks.length}`);
  for (const c of chunks) assert.equal(c.object, "chat.completion.chunk");
  assert.equal(new Set(chunks.map((c) => c.id)).size, 1, "one id for the whole stream");

  assert.equal(chunks[0].choices[0].delta.role, "assistant");
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, [], "the usage chunk has no choices");
  checkUsage(last.usage);
  for (const c of chunks.slice(0, -1)) {
    assert.equal(c.choices.length, 1);
    assert.ok(c.usage === null || c.usage === undefined, "only the final chunk carries usage");
  }
  const finishes = chunks.slice(0, -1).map((c) => c.choices[0].finish_reason).filter((f) => f);
  assert.equal(finishes.length, 1, "exactly one finish_reason");
  assert.ok(["stop", "length"].includes(finishes[0]), finishes[0]);
  assert.ok(chunks.at(-2).choices[0].finish_reason, "the finish_reason comes just before the usage chunk");
  const text = chunks.slice(0, -1).map((c) => c.choices[0].delta.content ?? "").join("");
  assert.ok(text.length > 0, "some content was streamed");
});

const PERSON = {
  type: "object",
  properties: {
    name: { type: "string", minLength: 1, maxLength: 40 },
    age: { type: "integer", minimum: 0, maximum: 120 },
    color: { type: "string", enum: ["red", "green", "blue"] },
    hobbies: { type: "array", items: { type: "string", maxLength: 30 }, minItems: 1, maxItems: 3 },
  },
  required: ["name", "age", "color", "hobbies"],
  additionalProperties: false,
};

test("response_format json_schema gives JSON that satisfies the schema", async () => {
  const r = await client.chat.completions.create({
    model,
    messages: [
      { role: "system", content: "You answer with JSON only." },
      { role: "user", content: "Describe Alice, a 31 year old who likes blue, hiking and chess." },
    ],
    temperature: 0,
    max_tokens: 300,
    response_format: { type: "json_schema", json_schema: { name: "person", schema: PERSON, strict: true } },
  });
  const { message, finish_reason } = r.choices[0];
  assert.equal(finish_reason, "stop", `the grammar closed the JSON: ${message.content}`);
  const value = JSON.parse(message.content);
  assert.equal(typeof value, "object");
  assert.ok(value !== null && !Array.isArray(value));
  assert.deepEqual(Object.keys(value).sort(), ["age", "color", "hobbies", "name"]);
  assert.equal(typeof value.name, "string");
  assert.ok(value.name.length >= 1 && value.name.length <= 40, value.name);
  assert.ok(Number.isInteger(value.age) && value.age >= 0 && value.age <= 120, String(value.age));
  assert.ok(["red", "green", "blue"].includes(value.color), value.color);
  assert.ok(Array.isArray(value.hobbies) && value.hobbies.length >= 1 && value.hobbies.length <= 3);
  for (const h of value.hobbies) assert.ok(typeof h === "string" && h.length <= 30, JSON.stringify(h));
});

const WEATHER_TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city.",
    parameters: {
      type: "object",
      properties: {
        city: { type: "string", description: "The city's name", maxLength: 40 },
        unit: { type: "string", enum: ["celsius", "fahrenheit"] },
      },
      required: ["city", "unit"],
      additionalProperties: false,
    },
  },
};

test("a named tool call streams as tool_calls deltas, and its result comes back as a tool message", async () => {
  const messages = [{ role: "user", content: "What is the weather like in Paris today?" }];
  const stream = await client.chat.completions.create({
    model,
    messages,
    tools: [WEATHER_TOOL],
    tool_choice: { type: "function", function: { name: "get_weather" } },
    temperature: 0,
    max_tokens: 100,
    stream: true,
  });
  const calls = [];
  let finish = null;
  let content = "";
  for await (const chunk of stream) {
    assert.equal(chunk.object, "chat.completion.chunk");
    const choice = chunk.choices[0];
    if (!choice) continue;
    content += choice.delta.content ?? "";
    for (const d of choice.delta.tool_calls ?? []) {
      assert.ok(Number.isInteger(d.index), JSON.stringify(d));
      const call = (calls[d.index] ??= { id: "", type: "", name: "", arguments: "" });
      if (d.id) call.id += d.id;
      if (d.type) call.type = d.type;
      if (d.function?.name) call.name += d.function.name;
      if (d.function?.arguments) call.arguments += d.function.arguments;
    }
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  assert.equal(content, "", "a forced call has no text content");
  assert.ok(["stop", "tool_calls"].includes(finish), String(finish));
  assert.equal(calls.length, 1, JSON.stringify(calls));
  const [call] = calls;
  assert.ok(call.id.length > 0, "the call has an id");
  assert.equal(call.type, "function");
  assert.equal(call.name, "get_weather");
  const args = JSON.parse(call.arguments);
  assert.ok(args && typeof args === "object" && !Array.isArray(args), call.arguments);
  assert.deepEqual(Object.keys(args).sort(), ["city", "unit"]);
  assert.equal(typeof args.city, "string");
  assert.ok(["celsius", "fahrenheit"].includes(args.unit), args.unit);

  messages.push(
    {
      role: "assistant",
      content: null,
      tool_calls: [{ id: call.id, type: "function", function: { name: call.name, arguments: call.arguments } }],
    },
    { role: "tool", tool_call_id: call.id, content: JSON.stringify({ temperature: 21, sky: "sunny" }) },
  );
  const r = await client.chat.completions.create({
    model,
    messages,
    tools: [WEATHER_TOOL],
    tool_choice: "none",
    temperature: 0,
    max_tokens: 40,
  });
  const [answer] = r.choices;
  assert.equal(answer.message.role, "assistant");
  assert.ok(!answer.message.tool_calls || answer.message.tool_calls.length === 0, "no tool call under 'none'");
  assert.equal(typeof answer.message.content, "string");
  assert.ok(answer.message.content.length > 0, "a text answer");
  assert.ok(["stop", "length"].includes(answer.finish_reason), answer.finish_reason);
  checkUsage(r.usage);
});
