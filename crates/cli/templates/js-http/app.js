// {{name}}: a Mayfly function in JavaScript.
//
// GET answers with a greeting (the GREETING environment variable, "Hello"
// if unset); POST answers with the request's body; other methods get 405.
// The handler is the Fetch API's, as on Cloudflare Workers: componentize-js
// turns the `fetch` event into wasi:http's incoming-handler.

import { getEnvironment } from 'wasi:cli/environment@0.2.10';

const FUNCTION = '{{name}}';

// Read per request, not at load: componentize-js runs the module's top
// level at build time, so a value read then would be the build machine's.
function greeting() {
  const found = getEnvironment().find(([key]) => key === 'GREETING');
  return found ? found[1] : 'Hello';
}

async function handle(request) {
  if (request.method === 'GET') {
    return new Response(`${greeting()} from ${FUNCTION}!\n`, {
      headers: { 'content-type': 'text/plain; charset=utf-8' },
    });
  }
  if (request.method === 'POST') {
    return new Response(await request.arrayBuffer(), {
      headers: { 'content-type': 'application/octet-stream' },
    });
  }
  return new Response('use GET or POST\n', {
    status: 405,
    headers: { 'content-type': 'text/plain; charset=utf-8' },
  });
}

addEventListener('fetch', (event) => event.respondWith(handle(event.request)));
