// Minimal VS Code client for `ds4-agent lsp`. CommonJS, no build step.
//
// The server owns the command ids ds4.fix / ds4.explain / ds4.ask / ds4.reindex
// (vscode-languageclient registers them from the server's executeCommandProvider).
// This extension adds wrapper commands that gather input from the editor, send
// workspace/executeCommand and show the result.
"use strict";

const vscode = require("vscode");
const { LanguageClient, TransportKind } = require("vscode-languageclient/node");

/** @type {LanguageClient | undefined} */
let client;

const SETTING_KEYS = ["model", "endpoint", "modelName", "apiKey", "budget", "testCommand"];

/** The ds4 settings the server reads, without empty values. */
function serverSettings() {
  const cfg = vscode.workspace.getConfiguration("ds4");
  const out = {};
  for (const key of SETTING_KEYS) {
    const value = cfg.get(key);
    if (value !== undefined && value !== null && value !== "") {
      out[key] = value;
    }
  }
  return out;
}

function executeCommand(command, args) {
  if (!client) {
    throw new Error("the ds4 language server is not running");
  }
  return client.sendRequest("workspace/executeCommand", {
    command,
    arguments: args === undefined ? [] : [args],
  });
}

/** The active file editor's uri and selection, in protocol form, or {}. */
function editorLocation() {
  const editor = vscode.window.activeTextEditor;
  if (!editor || editor.document.uri.scheme !== "file") {
    return {};
  }
  const c2p = client.code2ProtocolConverter;
  return {
    uri: c2p.asUri(editor.document.uri),
    range: c2p.asRange(editor.selection),
    empty: editor.selection.isEmpty,
  };
}

async function showMarkdown(content) {
  const doc = await vscode.workspace.openTextDocument({ language: "markdown", content });
  await vscode.window.showTextDocument(doc, { preview: false, viewColumn: vscode.ViewColumn.Beside });
}

function withProgress(title, task) {
  return vscode.window.withProgress(
    { location: vscode.ProgressLocation.Notification, title, cancellable: false },
    task
  );
}

function reportError(what, err) {
  const message = err && err.message ? err.message : String(err);
  vscode.window.showErrorMessage(`ds4: ${what} failed: ${message}`);
}

async function fixPrompt() {
  const issue = await vscode.window.showInputBox({
    title: "ds4: Fix an issue",
    prompt: "Describe the issue to fix",
    ignoreFocusOut: true,
  });
  if (!issue) {
    return;
  }
  const loc = editorLocation();
  const args = { issue };
  if (loc.uri) {
    args.uri = loc.uri;
    if (!loc.empty) {
      args.range = loc.range;
    }
  }
  try {
    // The server reports $/progress and applies the edit via workspace/applyEdit.
    const result = await withProgress("ds4: fixing…", () => executeCommand("ds4.fix", args));
    const status = result && result.status ? result.status : "done";
    const applied = result && result.applied ? " (edit applied)" : "";
    const choice = await vscode.window.showInformationMessage(
      `ds4 fix: ${status}${applied}`,
      ...(result && result.diff ? ["Show diff"] : [])
    );
    if (choice === "Show diff") {
      const doc = await vscode.workspace.openTextDocument({ language: "diff", content: result.diff });
      await vscode.window.showTextDocument(doc, { preview: false });
    }
  } catch (err) {
    reportError("fix", err);
  }
}

async function explainSelection() {
  const loc = editorLocation();
  if (!loc.uri) {
    vscode.window.showWarningMessage("ds4: open a file and select the code to explain.");
    return;
  }
  try {
    const result = await withProgress("ds4: explaining…", () =>
      executeCommand("ds4.explain", { uri: loc.uri, range: loc.range })
    );
    await showMarkdown((result && result.markdown) || "_(no explanation)_");
  } catch (err) {
    reportError("explain", err);
  }
}

async function askPrompt() {
  const question = await vscode.window.showInputBox({
    title: "ds4: Ask about the repository",
    prompt: "Question",
    ignoreFocusOut: true,
  });
  if (!question) {
    return;
  }
  try {
    const result = await withProgress("ds4: thinking…", () => executeCommand("ds4.ask", { question }));
    let content = `# ${question}\n\n${(result && result.answer) || "_(no answer)_"}\n`;
    const refs = (result && result.references) || [];
    if (refs.length > 0) {
      content += "\n## References\n\n";
      for (const ref of refs) {
        const line = ref.range ? ref.range.start.line + 1 : 1;
        const uri = vscode.Uri.parse(ref.uri);
        const label = vscode.workspace.asRelativePath(uri);
        content += `- [${label}:${line}](${uri.with({ fragment: `L${line}` }).toString()})\n`;
      }
    }
    await showMarkdown(content);
  } catch (err) {
    reportError("ask", err);
  }
}

async function reindexNow() {
  try {
    const report = await withProgress("ds4: re-indexing…", () => executeCommand("ds4.reindex", {}));
    const summary = report && typeof report === "object" ? JSON.stringify(report) : String(report);
    vscode.window.showInformationMessage(`ds4: re-indexed ${summary}`);
  } catch (err) {
    reportError("reindex", err);
  }
}

async function activate(context) {
  const cfg = vscode.workspace.getConfiguration("ds4");
  const serverOptions = {
    command: cfg.get("command") || "ds4-agent",
    args: ["lsp"],
    transport: TransportKind.stdio,
  };
  const clientOptions = {
    documentSelector: [{ scheme: "file" }],
    initializationOptions: serverSettings(),
    // Sends workspace/didChangeConfiguration with {ds4: {...}} when settings change.
    synchronize: { configurationSection: "ds4" },
  };
  client = new LanguageClient("ds4", "ds4", serverOptions, clientOptions);

  context.subscriptions.push(
    vscode.commands.registerCommand("ds4.fixPrompt", fixPrompt),
    vscode.commands.registerCommand("ds4.explainSelection", explainSelection),
    vscode.commands.registerCommand("ds4.askPrompt", askPrompt),
    vscode.commands.registerCommand("ds4.reindexNow", reindexNow)
  );

  try {
    await client.start();
  } catch (err) {
    reportError(`starting "${serverOptions.command} lsp"`, err);
  }
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
