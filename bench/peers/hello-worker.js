// The JavaScript twin of guests/hello for the workerd peer in
// `cargo xtask bench`: the same status, content type and 14-byte body.
export default {
  fetch() {
    return new Response("Hello, world!\n", {
      headers: { "content-type": "text/plain" },
    });
  },
};
