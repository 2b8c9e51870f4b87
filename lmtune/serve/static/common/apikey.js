// The API key, as both pages use it (lmtune serve's and lmtune studio's, which serves this folder too): typed
// into the header's #api-key field, remembered in the browser, sent as a Bearer token; a 401 asks for it.
// A plain script loaded before the page's app.js, which uses these functions.
"use strict";

function apiKey() { return document.getElementById("api-key").value.trim(); }

// The request headers: the key's Authorization (if one is given), and the JSON content type for a body.
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

// An HTTP error with the server's message (and hint, where it gives one) and the response's status.
class ApiError extends Error {
  constructor(message, hint, status) { super(message); this.hint = hint || ""; this.status = status; }
}

// Whether an error is the server refusing the request for its key (none given, or a wrong one).
function needsApiKey(error) { return error instanceof ApiError && error.status === 401; }

// Fills the key field from `storage` (localStorage or sessionStorage) under `name`; when the field changes, the
// key is stored and `reload` fetches the page's data again with it.
function rememberApiKey(storage, name, reload) {
  const field = document.getElementById("api-key");
  field.value = storage.getItem(name) || "";
  field.addEventListener("change", () => {
    storage.setItem(name, apiKey());
    reload();
  });
}
