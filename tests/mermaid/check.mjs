// Parse Mermaid diagrams with Mermaid's own parser, offline and without a browser.
// Usage: node check.mjs FILE...  Prints one line per file, "ok" or "error: <message>",
// and exits 1 if any file does not parse. Mermaid reads `window` and `document`
// when it loads (for DOMPurify), so jsdom provides them.
import fs from "node:fs";
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>");
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const { default: mermaid } = await import("mermaid");

let failed = false;
for (const file of process.argv.slice(2)) {
  try {
    const result = await mermaid.parse(fs.readFileSync(file, "utf8"));
    console.log(`ok ${result.diagramType}`);
  } catch (error) {
    failed = true;
    console.log(`error: ${String(error.message || error).replace(/\n/g, " | ")}`);
  }
}
process.exit(failed ? 1 : 0);
