// The benchmark's ceiling client where curl is missing (a GPU host with no network to install
// it): one process fetches its list of ranged GETs one after another on one keep-alive
// connection, as `curl -K` does, writing each body to /dev/null or a file, and prints
// "<status> <bytes>" per request. Usage: node range_get.js REQUESTS.json
"use strict";
const fs = require("fs");
const http = require("http");
const https = require("https");

const requests = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const agents = {
  "http:": new http.Agent({ keepAlive: true, maxSockets: 1 }),
  "https:": null,
};

function get(req) {
  return new Promise((resolve, reject) => {
    const url = new URL(req.url);
    const secure = url.protocol === "https:";
    if (secure && !agents["https:"]) {
      const ca = req.ca ? fs.readFileSync(req.ca) : undefined;
      agents["https:"] = new https.Agent({ keepAlive: true, maxSockets: 1, ca });
    }
    const options = { headers: req.headers, agent: agents[url.protocol] };
    const request = (secure ? https : http).get(url, options, (response) => {
      let size = 0;
      const sink = req.output === "/dev/null" ? null : fs.createWriteStream(req.output);
      response.on("data", (chunk) => {
        size += chunk.length;
        if (sink) sink.write(chunk);
      });
      response.on("end", () => {
        const done = () => resolve(`${response.statusCode} ${size}`);
        if (sink) sink.end(done);
        else done();
      });
      response.on("error", reject);
    });
    request.on("error", reject);
  });
}

(async () => {
  for (const req of requests) {
    process.stdout.write((await get(req)) + "\n");
  }
  for (const agent of Object.values(agents)) if (agent) agent.destroy();
})().catch((e) => {
  process.stderr.write(String(e) + "\n");
  process.exit(1);
});
