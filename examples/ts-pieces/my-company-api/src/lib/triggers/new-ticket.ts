import { createTrigger, Property, TriggerStrategy } from '@activepieces/pieces-framework';
import { DedupeStrategy, Polling, pollingHelper } from '@activepieces/pieces-common';
import { companyAuth } from '../auth';
import { callApi, CompanyAuth } from '../common/config';

type Ticket = { id: string; title: string; priority: string; team: string; created_at: string };

const polling: Polling<any, { team?: string }> = {
  strategy: DedupeStrategy.LAST_ITEM,
  items: async ({ auth, propsValue }) => {
    const query = propsValue.team ? `?team=${encodeURIComponent(propsValue.team)}` : '';
    const { body } = await callApi<{ tickets: Ticket[] }>((auth as any).props as CompanyAuth, `/tickets${query}`);
    return body.tickets.map((ticket) => ({ id: ticket.id, data: ticket }));
  },
};

export const newTicketTrigger = createTrigger({
  auth: companyAuth,
  name: 'new_ticket',
  displayName: 'New Ticket',
  description: 'Triggers when a new ticket is created',
  type: TriggerStrategy.POLLING,
  props: {
    team: Property.ShortText({ displayName: 'Team', description: 'Only tickets of this team', required: false }),
  },
  sampleData: { id: 'T-1', title: 'Printer on fire', priority: 'high', team: 'support', created_at: '2026-01-01T00:00:00Z' },
  async onEnable(context) {
    await pollingHelper.onEnable(polling, { auth: context.auth, store: context.store, propsValue: context.propsValue });
  },
  async onDisable(context) {
    await pollingHelper.onDisable(polling, { auth: context.auth, store: context.store, propsValue: context.propsValue });
  },
  async run(context) {
    return await pollingHelper.poll(polling, context);
  },
  async test(context) {
    return await pollingHelper.test(polling, context);
  },
});
