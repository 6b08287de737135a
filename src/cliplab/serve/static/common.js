"use strict";
// Shared by cliplab's pages. A server started with --token answers the first request that carries it (a Bearer
// header, or the token parameter of a shared link on the page load) with an HttpOnly session cookie: images and
// later calls use the cookie, so the token is never put in a URL nor stored by a page.
window.cliplab = (function () {
  let token = "";
  async function api(url, options) {
    options = options || {};
    options.headers = Object.assign({}, options.headers || {}, token ? { Authorization: "Bearer " + token } : {});
    const r = await fetch(url, options);
    if (r.status === 401) {
      const t = window.prompt("This server needs an access token:");
      if (t) { token = t; return api(url, options); }
    }
    let body = null;
    try { body = await r.json(); } catch (e) { body = { error: "bad response (" + r.status + ")" }; }
    if (!r.ok) { throw new Error(body && body.error ? body.error : "HTTP " + r.status); }
    return body;
  }
  function status(text, isError) {
    const s = document.getElementById("status");
    s.textContent = text; s.className = isError ? "error" : "";
  }
  return { $: (id) => document.getElementById(id), api: api, status: status };
})();
