// Drives piecework's console in headless Chromium as a user would: logs in with an API key
// (after a wrong one is refused), opens the failed run it is given, retries it and sees it
// succeed, then visits every page. A screenshot of each page goes to PW_SCREENSHOTS. Any
// request to another host than the console's, or a script error on a page, fails it.
//
//   PW_CONSOLE_URL=http://127.0.0.1:8080 PW_CONSOLE_KEY=pwk_… PW_FAILED_RUN=<id> \
//   PW_FLOW=<flow id> PW_SCREENSHOTS=target/console-screenshots node tests/browser/console.js

'use strict';
const { chromium } = require('playwright-core');
const path = require('node:path');
const fs = require('node:fs');

const url = new URL(process.env.PW_CONSOLE_URL);
const key = process.env.PW_CONSOLE_KEY;
const failedRun = process.env.PW_FAILED_RUN;
const flow = process.env.PW_FLOW;
const shots = process.env.PW_SCREENSHOTS ?? 'target/console-screenshots';
const TIMEOUT = 30_000;

async function main() {
  fs.mkdirSync(shots, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.PW_CHROMIUM ?? '/usr/bin/chromium',
    // Chromium's own background traffic is refused on a closed network, noisily.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const problems = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
    page.setDefaultTimeout(TIMEOUT);
    page.on('pageerror', (err) => problems.push(`script error: ${err.message}`));
    page.on('console', (message) => {
      // Failed responses are reported below, with their address.
      if (message.type() === 'error' && !/Failed to load resource/.test(message.text())) problems.push(`console error: ${message.text()}`);
    });
    page.on('response', (response) => {
      // A refused key is answered 401 by design.
      if (response.status() >= 400 && response.status() !== 401) problems.push(`${response.status()} for ${response.url()}`);
    });
    page.on('request', (request) => {
      const host = new URL(request.url()).host;
      if (!request.url().startsWith('data:') && host !== url.host) problems.push(`request to another host: ${request.url()}`);
    });
    const shot = (name) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });

    // Logging in: a wrong key is refused, the right one shows who is logged in.
    await page.goto(url.href);
    await page.locator('input[name=key]').fill('pwk_wrong_key');
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.getByRole('alert').filter({ hasText: 'refused' }).waitFor();
    await shot('login');
    await page.locator('input[name=key]').fill(key);
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.locator('#who').filter({ hasText: 'admin' }).waitFor();
    await page.getByRole('heading', { name: 'Overview' }).waitFor();
    await page.locator('table').first().waitFor();
    await shot('overview');

    // The runs list shows the failed run; its page shows the failed step; a retry succeeds.
    await page.getByRole('link', { name: 'Runs' }).click();
    const row = page.locator(`tr[data-run="${failedRun}"]`);
    await row.locator('[data-status=failed]').waitFor();
    await shot('runs');
    await row.getByRole('link').first().click();
    await page.locator('.timeline li[data-status=failed]').waitFor();
    await shot('run-failed');
    await page.getByRole('button', { name: 'Retry from the failed step' }).click();
    await page.locator('.card .badge[data-status=succeeded]').waitFor();
    await page.locator('.timeline li[data-status=succeeded]').first().waitFor();
    await shot('run-retried');

    // Filtering the runs by status.
    await page.goto(`${url.origin}/#/runs?status=succeeded`);
    await page.locator(`tr[data-run="${failedRun}"] [data-status=succeeded]`).waitFor();

    // Every other page.
    await page.getByRole('link', { name: 'Flows' }).click();
    await page.locator(`tr[data-flow="${flow}"]`).waitFor();
    await shot('flows');
    await page.locator(`tr[data-flow="${flow}"]`).getByRole('link').first().click();
    await page.getByRole('heading', { name: /Definition/ }).waitFor();
    await shot('flow');
    await page.getByRole('link', { name: 'Pieces' }).click();
    await page.locator('tr[data-piece=http]').waitFor();
    await shot('pieces');
    await page.locator('tr[data-piece=my-company-api]').getByRole('link').first().click();
    await page.getByRole('heading', { name: 'Documentation' }).waitFor();
    await page.locator('.docs h2').first().waitFor();
    await shot('piece');
    // A connection made with the form the piece's auth describes; its secret never shows.
    await page.getByRole('link', { name: 'Connections' }).click();
    await page.getByRole('heading', { name: 'New connection' }).waitFor();
    const form = page.locator('form', { has: page.getByRole('heading', { name: 'New connection' }) });
    await form.locator('input[name=name]').fill('console-http');
    await form.locator('select[name=piece]').selectOption('http');
    await form.locator('select[name=kind]').selectOption({ label: 'Bearer token' });
    await form.locator('input[name=token]').fill('s3cret-console-token');
    await form.getByRole('button', { name: /Save/ }).click();
    await page.locator('tr[data-connection=console-http]').waitFor();
    if ((await page.content()).includes('s3cret-console-token')) throw new Error("the connection's secret is on the page");
    await shot('connections');
    await page.getByRole('link', { name: 'Audit' }).click();
    await page.locator('td', { hasText: 'run.retry' }).first().waitFor();
    await shot('audit');

    // A viewer's key: the same pages, none of the buttons its role may not use.
    if (process.env.PW_VIEWER_KEY) {
      await page.getByRole('button', { name: 'Log out' }).click();
      await page.locator('input[name=key]').fill(process.env.PW_VIEWER_KEY);
      await page.getByRole('button', { name: 'Log in' }).click();
      await page.locator('#who').filter({ hasText: 'viewer' }).waitFor();
      await page.goto(`${url.origin}/#/runs/${failedRun}`);
      await page.locator('.timeline li').first().waitFor();
      await page.goto(`${url.origin}/#/flows`);
      await page.locator(`tr[data-flow="${flow}"]`).waitFor();
      await page.goto(`${url.origin}/#/connections`);
      await page.locator('tr[data-connection=console-http]').waitFor();
      for (const forbidden of ['Retry from the failed step', 'Cancel', 'Disable', 'Enable', 'Delete']) {
        if (await page.getByRole('button', { name: forbidden, exact: true }).count()) throw new Error(`a viewer is offered ${forbidden}`);
      }
      if (await page.getByRole('heading', { name: 'New connection' }).count()) throw new Error('a viewer is offered a new connection');
      await shot('viewer-connections');
    }
  } finally {
    await browser.close();
  }
  if (problems.length) throw new Error(problems.join('\n'));
}

main().then(
  () => console.log('console: every page passed'),
  (err) => {
    console.error(err.stack ?? String(err));
    process.exit(1);
  },
);
